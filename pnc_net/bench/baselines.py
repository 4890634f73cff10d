"""Parameter-tuning baselines for the benchmark (``docs/benchmarks.md``, "The methods").

Every baseline sees exactly the cloning data PNC sees (same draw, same budget
``k`` per cloned class and ``k_t`` per target class, target-class samples
labelled by the target's own predictions, never by ground truth), runs on a
private ``copy.deepcopy`` of the zoo models, and gets the same small
learning-rate search, selected on the same validation samples PNC's position
search uses. Methods:

* **FT**: the target with its head widened to ``Y_t + Y_c``, new rows trained
  first with the body frozen (warm-up), then every weight.
* **LwF** (Li and Hoiem, 2016): FT plus distillation of the target's recorded
  old-class outputs at temperature 2 on every training image, with the
  paper's warm-up of the new rows before joint training.
* **KD**: the widened target trained from two teachers (Hinton et al., 2015):
  the source(s) on their ``Y_c`` logits and the target itself on ``Y_t``.
* **PNC-F**: the PNC superbody, then every weight of it fine-tuned.
* **Oracle**: one network of the target's architecture trained from scratch
  on the full train split of ``Y_t + Y_c`` with the zoo recipe (upper bound).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import zstandard
from torch import nn

from pnc_net.checkpoints import build_arch
from pnc_net.cloning import CloneConfig, _take
from pnc_net.data import Dataset
from pnc_net.errors import InvalidInputError
from pnc_net.insert import augment_transforms
from pnc_net.metrics import clone_metrics
from pnc_net.models import ZooNet
from pnc_net.superbody import NO_ENERGY_VETO, Superbody
from pnc_net.training import ModuleT, predict_logits, train_classifier
from pnc_net.zoo import Manifest, Zoo, as_network
from pnc_net.zoo_train import class_subset

TUNING_METHODS = ("FT", "LwF", "KD")
DELTA_ZSTD_LEVEL = 19  # generous to the baselines: the strongest standard level


@dataclass(frozen=True)
class TuneConfig:
    """Training recipe shared by every tuning baseline (one place, so effort is equal)."""

    lrs: tuple[float, ...] = (1e-3, 3e-4)  # the learning-rate search, selected on validation
    epochs: int = 16  # over shift-augmented batches; PNC's adapter sees 6 x 4 shifted copies
    min_steps: int = 50  # tiny budgets still get enough updates ...
    max_steps: int = 160  # ... and large ones are capped (compute: 2 cores)
    warmup_epochs: int = 2  # new head rows only, body frozen (LwF's warm-up)
    batch_size: int = 32
    max_shift: int = 2
    temperature: float = 2.0  # LwF's T
    distill_weight: float = 1.0
    freeze_bn_stats: bool = True  # see FrozenStats: stronger baselines on skewed small data
    oracle_lrs: tuple[float, ...] = (3e-3, 1e-3)
    oracle_epochs: int = 6  # the zoo recipe

    def __post_init__(self) -> None:
        if not self.lrs or any(lr <= 0 for lr in self.lrs + self.oracle_lrs):
            raise InvalidInputError(f"learning rates must be positive, got {self.lrs}")
        if self.epochs < 1 or self.oracle_epochs < 1 or self.batch_size < 1:
            raise InvalidInputError("epochs and batch size must be at least 1")
        if not 1 <= self.min_steps <= self.max_steps:
            raise InvalidInputError(f"need 1 <= min_steps <= max_steps, got {self.min_steps}, "
                                    f"{self.max_steps}")


@dataclass
class TaskData:
    """The cloning data of one task in the superbody's label space (target labels first)."""

    target: ZooNet
    target_manifest: Manifest
    sources: list[tuple[ZooNet, tuple[int, ...]]]  # model, cloned indices in its label space
    label_names: tuple[str, ...]
    x: torch.Tensor  # new samples then target-class samples
    y: torch.Tensor  # true labels for new samples, the target's predictions for old ones
    x_val_new: torch.Tensor
    y_val_new: torch.Tensor
    x_val_old: torch.Tensor
    source_refs: list[tuple[ZooNet, tuple[str, ...]]] = field(default_factory=list)
    # the transforms PNC's check keeps: PNC-F tunes the superbody on them, as PNC trained it;
    # FT, LwF and KD keep shifts only, which measured better for them (docs/benchmarks.md)
    augment: tuple[str, ...] = ()

    @property
    def n_target(self) -> int:
        """How many of ``label_names`` are the target's (they come first)."""
        return len(self.target_manifest.label_names)


class Evaluated(nn.Module):
    """Makes any model over ``Y_t + Y_c`` look like a superbody to ``clone_metrics``:
    locality is then measured against the untouched zoo ``target``."""

    def __init__(self, model: nn.Module, target: ZooNet, target_labels: tuple[str, ...],
                 label_names: tuple[str, ...]) -> None:
        super().__init__()
        self.model, self.target = model, target
        self.target_labels, self.label_names = tuple(target_labels), tuple(label_names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The wrapped model's scores over ``label_names``."""
        return self.model(x)

    def module_bytes(self) -> int:
        """fp32 bytes of the wrapped model's weights (``superbody_bytes`` of a superbody)."""
        return sum(t.numel() * 4 for t in self.model.state_dict().values() if t.is_floating_point())


@dataclass
class BaselineResult:
    method: str
    metrics: dict
    bytes: int  # what must travel to the receiver, who holds the zoo
    params_modified: int  # scalars that differ from the zoo weights, or are new
    seconds: float
    lr: float | None
    model: nn.Module


# ----------------------------------------------------------------------------- data


def task_data(zoo: Zoo, data: Dataset, cfg: CloneConfig) -> TaskData:
    """Draw the very samples ``pnc_net.cloning.plan`` draws for ``cfg``."""
    target, t_man = zoo.load(cfg.target)
    k, kt, seed = cfg.per_class, cfg.target_per_class, cfg.seed
    xs, ys, xv, yv, sources, refs, labels = [], [], [], [], [], [], list(t_man.label_names)
    judges: list = []
    for spec in cfg.sources:
        source, s_man = zoo.load(spec.source)
        missing = [c for c in spec.classes if c not in s_man.label_names]
        if missing:
            raise InvalidInputError(f"class(es) {missing} are not in source {s_man.name}")
        offset = len(labels)
        x_new, y_new = _take(data, "train", spec.classes, k, seed, "cloned")
        x_vn, y_vn = _take(data, "val", spec.classes, min(k, 50), seed, "cloned")
        xs.append(x_new)
        ys.append(y_new + offset)
        xv.append(x_vn)
        yv.append(y_vn + offset)
        sources.append((source, tuple(s_man.label_names.index(c) for c in spec.classes)))
        judges.append((spec.source, source, torch.cat([x_new, x_vn]),  # as augment_judges
                       torch.tensor(sources[-1][1])[torch.cat([y_new, y_vn])]))
        refs.append((source, s_man.label_names))
        labels.extend(spec.classes)
    x_old = _take(data, "train", t_man.label_names, kt, seed, "target")[0] if kt else xs[0][:0]
    x_vo = _take(data, "val", t_man.label_names, min(kt, 50), seed, "target")[0] if kt else xs[0][:0]
    y_old = predict_logits(target, x_old).argmax(1) if len(x_old) else ys[0][:0]
    if len(x_vo):
        judges.append(("target", target, x_vo, None))
    augment, _ = augment_transforms(cfg.insert, xs[0].shape[1], judges, seed)
    return TaskData(target, t_man, sources, tuple(labels), torch.cat([*xs, x_old]),
                    torch.cat([*ys, y_old]), torch.cat(xv), torch.cat(yv), x_vo, refs, augment)


# ----------------------------------------------------------------------------- models


def widened(target: ZooNet, n_total: int, seed: int) -> ZooNet:
    """A private copy of ``target`` whose head predicts ``n_total`` classes; old rows kept."""
    model = copy.deepcopy(target)
    old = model.head.fc
    torch.manual_seed(seed)
    fc = nn.Linear(old.in_features, n_total)
    with torch.no_grad():
        fc.weight[: old.out_features] = old.weight
        fc.bias[: old.out_features] = old.bias
    model.head.fc = fc
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def distill(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    """Hinton's soft-target loss, scaled by T^2 so its gradients match the hard loss."""
    return t * t * F.kl_div((student / t).log_softmax(1), (teacher / t).log_softmax(1),
                            log_target=True, reduction="batchmean")


def extra_loss_for(method: str, td: TaskData, cfg: TuneConfig) -> Callable | None:
    """The distillation term of LwF / KD (``None`` for FT)."""
    n_t, t, w = td.n_target, cfg.temperature, cfg.distill_weight
    if method == "FT":
        return None

    def lwf(xb: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            z_t = td.target(xb)
        return w * distill(logits[:, :n_t], z_t, t)

    def kd(xb: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        loss = lwf(xb, logits)
        offset = n_t
        for source, cloned in td.sources:
            with torch.no_grad():
                z_s = source(xb)[:, list(cloned)]
            loss = loss + w * distill(logits[:, offset : offset + len(cloned)], z_s, t)
            offset += len(cloned)
        return loss

    return {"LwF": lwf, "KD": kd}[method]


def epochs_for(n: int, cfg: TuneConfig) -> int:
    """``cfg.epochs``, stretched to ``min_steps`` or cut to ``max_steps`` updates."""
    per_epoch = max(1, -(-n // cfg.batch_size))
    steps = min(max(cfg.epochs * per_epoch, cfg.min_steps), cfg.max_steps)
    return max(1, round(steps / per_epoch))


def tune(model: ZooNet, td: TaskData, lr: float, cfg: TuneConfig, seed: int,
         extra: Callable | None) -> ZooNet:
    """Warm-up of the head (body frozen), then every weight: LwF's two-stage schedule."""
    if cfg.warmup_epochs:
        fit(model, td, cfg, epochs=cfg.warmup_epochs, lr=lr * 3, seed=seed, extra=extra,
            params=list(model.head.parameters()))
    return fit(model, td, cfg, epochs=epochs_for(len(td.x), cfg), lr=lr, seed=seed, extra=extra)


def val_score(model: nn.Module, td: TaskData) -> float:
    """PNC's selection rule: mean of new-class accuracy and fidelity to the target on
    validation target-class samples; without them (``k_t = 0``), fidelity is the
    agreement of the old-class scores with the target on the new samples (LwF's view)."""
    z = predict_logits(model, td.x_val_new)
    acc_new = float((z.argmax(1) == td.y_val_new).float().mean())
    if len(td.x_val_old):
        agree = predict_logits(model, td.x_val_old).argmax(1) == predict_logits(
            td.target, td.x_val_old).argmax(1)
    else:
        agree = z[:, : td.n_target].argmax(1) == predict_logits(td.target, td.x_val_new).argmax(1)
    return (acc_new + float(agree.float().mean())) / 2


def lr_search(build: Callable[[], ModuleT], train: Callable[[ModuleT, float], ModuleT],
              lrs: Sequence[float], score: Callable[[ModuleT], float]) -> tuple[float, ModuleT]:
    """Train one model per learning rate; keep the best validation score (ties: first).

    Returns ``(learning rate, model)`` of the best.

    Raises:
        InvalidInputError: ``lrs`` is empty.
    """
    best: tuple[float, float, ModuleT] | None = None
    for lr in lrs:
        model = train(build(), lr)
        s = score(model)
        if best is None or s > best[0]:
            best = (s, lr, model)
    if best is None:
        raise InvalidInputError("the learning-rate search needs at least one learning rate")
    return best[1], best[2]


# ----------------------------------------------------------------------------- bytes


def _fp16(t: torch.Tensor) -> bytes:
    return t.detach().cpu().float().half().contiguous().numpy().tobytes()


def delta_payload(tuned: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> tuple[bytes, int]:
    """fp16 bytes of ``tuned - base`` (every float tensor; rows beyond the base's shape,
    such as a widened head's new rows, travel whole) and how many scalars changed."""
    chunks, changed = [], 0
    for name, t in sorted(tuned.items()):
        if not t.is_floating_point():
            continue
        b = base.get(name)
        if b is None or b.dim() != t.dim() or any(x < y for x, y in zip(t.shape, b.shape)):
            chunks.append(_fp16(t))
            changed += t.numel()
            continue
        d = t.clone()
        region = tuple(slice(0, n) for n in b.shape)
        d[region] = t[region] - b
        chunks.append(_fp16(d))
        changed += int((t[region] != b).sum()) + t.numel() - b.numel()
    return b"".join(chunks), changed


def zstd_size(payload: bytes, level: int = DELTA_ZSTD_LEVEL) -> int:
    """Bytes of ``payload`` after zstd at ``level``: what a tuned model's delta costs to send."""
    return len(zstandard.ZstdCompressor(level=level).compress(payload))


def delta_bytes(tuned: nn.Module, base: nn.Module) -> tuple[int, int]:
    """``(zstd bytes of the fp16 weight delta, scalars modified)`` of ``tuned`` vs ``base``."""
    payload, changed = delta_payload(tuned.state_dict(), base.state_dict())
    return zstd_size(payload), changed


# ----------------------------------------------------------------------------- methods


def run_tuning(method: str, td: TaskData, data: Dataset, cfg: TuneConfig,
               seed: int) -> BaselineResult:
    """FT, LwF or KD on a private copy of the target."""
    if method not in TUNING_METHODS:
        raise InvalidInputError(f"unknown tuning method {method!r}; use one of {TUNING_METHODS}")
    t0 = time.perf_counter()
    extra = extra_loss_for(method, td, cfg)
    lr, model = lr_search(lambda: widened(td.target, len(td.label_names), seed),
                          lambda m, lr: tune(m, td, lr, cfg, seed, extra), cfg.lrs,
                          lambda m: val_score(m, td))
    seconds = time.perf_counter() - t0
    return _result(method, model, td, data, seconds, lr, *delta_bytes(model, td.target))


class FrozenStats(nn.Module):
    """Fine-tunes ``model`` with its BatchNorm running statistics frozen.

    The cloning data is a few hundred images of a skewed class mix (only the
    cloned classes when ``k_t = 0``); letting BatchNorm re-estimate its
    statistics from them shifts every feature the old classes rely on. Frozen
    statistics (affine parameters still train) are the standard small-data
    choice and made the baselines stronger, so they get it.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def train(self, mode: bool = True) -> FrozenStats:
        """``nn.Module.train``, except that every BatchNorm stays in eval mode."""
        super().train(mode)
        for m in self.model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The wrapped model's logits."""
        return self.model(x)


def fit(model: ModuleT, td: TaskData, cfg: TuneConfig, *, epochs: int, lr: float, seed: int,
        extra: Callable | None = None, params: list | None = None,
        augment: tuple[str, ...] = ()) -> ModuleT:
    """``train_classifier`` on the cloning data with the shared recipe (shifts, and
    ``augment``'s transforms: PNC-F's, not FT's, LwF's or KD's; ``TaskData.augment``)."""
    wrapped = FrozenStats(model) if cfg.freeze_bn_stats else model
    train_classifier(wrapped, td.x, td.y, epochs=epochs, lr=lr, batch_size=cfg.batch_size,
                     max_shift=cfg.max_shift, augment=augment, seed=seed, progress=False,
                     extra_loss=extra, params=params, recalibrate_bn=not cfg.freeze_bn_stats)
    return model.eval()


class _LogProbs(nn.Module):
    """A superbody returns probabilities; training wants log-probabilities as logits."""

    def __init__(self, superbody: Superbody) -> None:
        super().__init__()
        self.superbody = superbody

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.superbody(x).clamp_min(1e-8).log()


def run_pnc_f(superbody: Superbody, td: TaskData, data: Dataset, cfg: TuneConfig, seed: int,
              package_bytes: int, pnc_seconds: float) -> BaselineResult:
    """PNC-F: the PNC superbody with every weight (target, branch, adapter, gate) tuned.
    What travels: the package plus the zstd fp16 delta against the PNC superbody.

    The gates' energy vetoes are lifted while it tunes and recalibrated after
    (``tuned_energy_vetoes``): a veto shuts the gate exactly on most cloned training
    samples, so their loss has no gradient and Adam turned the target's rounding noise
    into full steps (every input then read as class 0: acc_new 0.0 at k_t = 0)."""
    t0 = time.perf_counter()
    cloned_x = td.x[td.y >= td.n_target]

    def build() -> _LogProbs:
        model = _LogProbs(copy.deepcopy(superbody))
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def train(model: _LogProbs, lr: float) -> _LogProbs:
        with tuned_energy_vetoes(model.superbody, cloned_x):
            return fit(model, td, cfg, epochs=epochs_for(len(td.x), cfg), lr=lr, seed=seed,
                       augment=td.augment)

    lr, model = lr_search(build, train, cfg.lrs, lambda m: val_score(m, td))
    seconds = pnc_seconds + time.perf_counter() - t0
    delta, changed = delta_bytes(model.superbody, superbody)
    return _result("PNC-F", model, td, data, seconds, lr, package_bytes + delta, changed)


@contextmanager
def tuned_energy_vetoes(superbody: Superbody, cloned_x: torch.Tensor) -> Iterator[None]:
    """Lift every gate's energy veto for the ``with`` body (the superbody's weights are
    tuned there), then set it again by PNC's own rule on the tuned target: the quantile
    of its logsumexp on the cloned training samples ``cloned_x`` that lets through the
    fraction the original veto let through under the original target."""
    vetoes = energy_vetoes(superbody)
    with torch.no_grad():
        before = predict_logits(superbody.target, cloned_x).logsumexp(1)
    passed = [None if float(v) >= NO_ENERGY_VETO else float((before <= v).float().mean())
              for v in vetoes]
    for v in vetoes:
        v.fill_(NO_ENERGY_VETO)
    yield
    with torch.no_grad():
        after = predict_logits(superbody.target, cloned_x).logsumexp(1)
    for v, q in zip(vetoes, passed):
        if q is not None:
            v.fill_(float(torch.quantile(after, q)))


def energy_vetoes(superbody: Superbody) -> list[torch.Tensor]:
    """Every gate's ``energy_max`` buffer (``NO_ENERGY_VETO`` where none was calibrated)."""
    return [b for name, b in superbody.named_buffers() if name.endswith("energy_max")]


def run_oracle(td: TaskData, data: Dataset, cfg: TuneConfig, seed: int) -> BaselineResult:
    """Joint training from scratch on the full train split of ``Y_t + Y_c`` (upper bound).
    It shares nothing with the zoo, so the whole fp16 model must travel."""
    t0 = time.perf_counter()
    man = td.target_manifest
    x, y = class_subset(data, td.label_names, "train")
    xv, yv = class_subset(data, td.label_names, "val")

    def build() -> ZooNet:
        torch.manual_seed(seed)
        return fresh_network(man, len(td.label_names))

    def train(model: ZooNet, lr: float) -> ZooNet:
        return train_classifier(model, x, y, epochs=cfg.oracle_epochs, lr=lr, seed=seed,
                                progress=False)

    def score(model: ZooNet) -> float:
        return float((predict_logits(model, xv).argmax(1) == yv).float().mean())

    lr, model = lr_search(build, train, cfg.oracle_lrs, score)
    seconds = time.perf_counter() - t0
    payload, _ = delta_payload(model.state_dict(), {})
    n_params = sum(p.numel() for p in model.parameters())
    return _result("Oracle", model, td, data, seconds, lr, zstd_size(payload), n_params)


def fresh_network(manifest: Manifest, num_classes: int) -> ZooNet:
    """A random-init network of ``manifest``'s architecture predicting ``num_classes``
    classes, as cloning sees networks: a pnc ``ZooNet``, or a torchvision / timm module in
    a ``GraphNet`` that applies the manifest's mean and std (``zoo.as_network``)."""
    module = build_arch(manifest.arch, {**manifest.arch_args, "num_classes": num_classes})
    return as_network(module.eval(), manifest)  # an import is traced in eval mode


def _result(method: str, model: nn.Module, td: TaskData, data: Dataset, seconds: float,
            lr: float | None, nbytes: int, changed: int) -> BaselineResult:
    wrapped = Evaluated(model, td.target, td.target_manifest.label_names, td.label_names)
    metrics = clone_metrics(wrapped, data, td.source_refs)
    return BaselineResult(method, metrics, nbytes, changed, seconds, lr, model)
