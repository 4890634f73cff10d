"""Cloning end to end: localize, insert, search, refine, package (``docs/method.md``).

``clone(zoo, data, CloneConfig(...))`` is the in-process path. Its steps are
plain functions over a ``CloneJob`` so that ``pnc_net.cluster`` can spread the
independent ones (localization per source, candidate positions) over Ray
actors and reduce exactly as this module does.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from pnc_net import __version__
from pnc_net.data import Dataset, select_classes
from pnc_net.devices import CPU, PRECISIONS, Compute, on_device, parse_device
from pnc_net.errors import IncompatibleError, InvalidInputError
from pnc_net.insert import (
    CloneData,
    InsertConfig,
    Prepared,
    augment_judges,
    augment_transforms,
    insert_candidate,
    prepare,
)
from pnc_net.localize import LocalizeConfig, localize, refine_through_branch, units_after
from pnc_net.memory import LARGEST_DEFAULT_BATCH, activation_budget, batch_cap
from pnc_net.metrics import clone_metrics
from pnc_net.models import ZooNet
from pnc_net.package import ClonedModule, Package, ZooRef
from pnc_net.rebuild import branch_config, branch_tensors, fingerprint_of
from pnc_net.search import (
    SEARCH_MODES,
    best_candidate,
    check_candidates,
    default_candidates,
    rung_insert_config,
    successive_halving,
)
from pnc_net.superbody import Branch, DiscriminantGate, Superbody
from pnc_net.synthesize import SynthesizeConfig, cached_target_samples
from pnc_net.training import predict_logits
from pnc_net.zoo import Manifest, Zoo


@dataclass(frozen=True)
class SourceSpec:
    """A source model and the classes (label names) to take from it."""

    source: str
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.classes:
            raise InvalidInputError(f"no classes given to clone from {self.source!r}")
        if len(set(self.classes)) != len(self.classes):
            raise InvalidInputError(f"classes {list(self.classes)} repeat a label")


@dataclass(frozen=True)
class CloneConfig:
    """One clone task. Defaults run on 2 CPU cores in about a minute on the MNIST zoo."""

    target: str
    sources: tuple[SourceSpec, ...]
    per_class: int = 100  # k: cloned-class samples per class
    target_per_class: int = 20  # k_t: target-class samples per class (0 = the article's setting)
    seed: int = 0
    positions: tuple[tuple[int, int], ...] | None = None  # None = default_candidates
    synthesize: bool = True  # invert the target for extra (k_t = 0: stand-in) target samples
    localize: LocalizeConfig = field(default_factory=LocalizeConfig)
    insert: InsertConfig = field(default_factory=InsertConfig)
    # the most images any pass holds at once (None: each step's own, see with_batch_size)
    batch_size: int | None = None
    search: str = "exhaustive"  # or "halving": successive halving over positions (search.py)
    # where the steps compute (pnc_net/devices.py): cpu (bit-reproducible), auto, cuda[:N];
    # checked here for spelling, resolved against this machine's GPUs by ``plan``
    device: str = "cpu"
    precision: str = "fp32"  # or bf16: autocast of passes without gradients, CUDA only

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", parse_device(self.device))
        if self.precision not in PRECISIONS:
            raise InvalidInputError(
                f"--precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.search not in SEARCH_MODES:
            raise InvalidInputError(
                f"--search {self.search!r} is not one of {', '.join(SEARCH_MODES)}")
        if self.batch_size is not None and self.batch_size < 1:
            raise InvalidInputError(f"--batch-size must be at least 1, got {self.batch_size}")
        if not self.sources:
            raise InvalidInputError("a clone needs at least one source")
        if self.per_class < 1:
            raise InvalidInputError(f"--per-class must be at least 1, got {self.per_class}")
        if self.target_per_class < 0:
            raise InvalidInputError(f"--target-per-class must be >= 0, got {self.target_per_class}")
        labels = [c for s in self.sources for c in s.classes]
        if len(set(labels)) != len(labels):
            raise InvalidInputError(f"two sources clone the same class: {labels}")

    def with_batch_size(self, n: int | None) -> CloneConfig:
        """This config with no pass holding more than ``n`` images at once.

        Each step keeps its own measured batch when it is smaller: 512 for passes
        without gradients (cached features, scores, metrics), 256 for localization's
        scores and the target's inversion, 64 for adapter steps. Lowering ``n`` bounds
        a clone's activation memory for large inputs; the inversion matches BatchNorm
        statistics per batch, so a smaller batch there gives other stand-ins.
        """
        if n is None:
            return replace(self, batch_size=None)
        return replace(
            self, batch_size=n,
            localize=replace(self.localize, batch_size=min(self.localize.batch_size, n)),
            insert=replace(self.insert, batch_size=min(self.insert.batch_size, n),
                           eval_batch_size=min(self.insert.eval_batch_size, n)))

    @property
    def eval_batch_size(self) -> int:
        """Images per forward pass without gradients (metrics, inversion cap)."""
        return self.insert.eval_batch_size

    @classmethod
    def single(cls, target: str, source: str, classes: Sequence[str], **kw) -> CloneConfig:
        """A clone from one source; other fields pass as keywords."""
        return cls(target=target, sources=(SourceSpec(source, tuple(classes)),), **kw)


@dataclass
class ModuleJob:
    """Everything one source's branch needs; built once, reused by every candidate."""

    source: ZooNet
    manifest: Manifest
    cloned: tuple[int, ...]  # indices into the source's labels
    cloned_labels: tuple[str, ...]
    data: CloneData
    candidates: list[tuple[int, int]]
    masks: dict[str, torch.Tensor] | None = None
    prepared: Prepared | None = None


@dataclass
class CloneJob:
    """A planned clone: the loaded target and one ``ModuleJob`` per source."""

    cfg: CloneConfig
    target: ZooNet
    target_manifest: Manifest
    modules: list[ModuleJob]
    compute: Compute = CPU  # resolved from cfg.device/precision; the models live there

    @property
    def target_labels(self) -> tuple[str, ...]:
        """The target's label names (the superbody's first outputs)."""
        return self.target_manifest.label_names

    @property
    def input_shape(self) -> tuple[int, ...]:
        """``(C, H, W)`` of the target's (and every source's) inputs."""
        return tuple(self.target_manifest.input_shape)


@dataclass
class CloneResult:
    """What ``clone`` returns: the package to send, the superbody it rebuilds, the report."""

    package: Package
    superbody: Superbody
    report: dict


# ----------------------------------------------------------------------------- planning


def _data_indices(data: Dataset, labels: Sequence[str], role: str) -> list[int]:
    missing = [n for n in labels if n not in data.label_names]
    if missing:
        raise InvalidInputError(
            f"{role} label(s) {missing} are not in dataset {data.name!r} "
            f"(labels: {', '.join(data.label_names)})")
    return [data.label_names.index(n) for n in labels]


def _take(data: Dataset, split: str, labels: Sequence[str], per_class: int, seed: int,
          role: str) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = select_classes(*data.split(split), _data_indices(data, labels, role), per_class, seed)
    remap = {data.label_names.index(n): i for i, n in enumerate(labels)}
    return x, torch.tensor([remap[int(v)] for v in y], dtype=torch.long)


def _clone_data(data: Dataset, new: Sequence[str], old: Sequence[str], cfg: CloneConfig,
                others: Sequence[str], synthetic: torch.Tensor | None) -> CloneData:
    """Samples of the cloned classes, of the target's classes plus ``synthetic`` ones
    (with ``k_t = 0`` the synthetic ones stand in: half for training, half for
    validation) and of the classes other sources contribute (gate negatives)."""
    k, kt, seed = cfg.per_class, cfg.target_per_class, cfg.seed
    x_new, y_new = _take(data, "train", new, k, seed, "cloned")
    if len(x_new) == 0:
        raise InvalidInputError(f"dataset {data.name!r} has no training samples of {list(new)}")
    none = x_new[:0]
    x_old, _ = _take(data, "train", old, kt, seed, "target") if kt else (none, None)
    x_oth, _ = _take(data, "train", others, k, seed, "cloned") if others else (none, None)
    xv_new, yv_new = _take(data, "val", new, min(k, 50), seed, "cloned")
    xv_old, _ = _take(data, "val", old, min(kt, 50), seed, "target") if kt else (none, None)
    n_real = len(x_old)
    if synthetic is not None:
        if kt:
            x_old = torch.cat([x_old, synthetic])
        else:
            x_old, xv_old = synthetic[0::2], synthetic[1::2]
    stand_in = torch.zeros(len(x_old) + len(x_oth), dtype=torch.bool)
    stand_in[n_real : len(x_old)] = True
    return CloneData(x_new, y_new, torch.cat([x_old, x_oth]), xv_new, yv_new, xv_old,
                     real_val_old=bool(kt), old_stand_in=stand_in)


def check_input_shapes(target: Manifest, source: Manifest, data: Dataset) -> None:
    """Refuse data the target was not made for, and a source with another input shape.

    Raises:
        IncompatibleError: the shapes differ.
    """
    if tuple(target.input_shape) != data.input_shape:
        raise IncompatibleError(
            f"target {target.name} takes inputs {tuple(target.input_shape)} but dataset "
            f"{data.name!r} has {data.input_shape}; clone with data the target was made for")
    if tuple(source.input_shape) != tuple(target.input_shape):
        raise IncompatibleError(
            f"source {source.name} takes inputs {tuple(source.input_shape)} but target "
            f"{target.name} takes {tuple(target.input_shape)}: localization runs the source on "
            "the cloning data, so the two must share an input shape")


def plan(zoo: Zoo, data: Dataset, cfg: CloneConfig) -> CloneJob:
    """Resolve models, check compatibility and draw the cloning data.

    The models are moved to ``cfg.device`` as private copies (zoo models are shared);
    the cloning data stays on the CPU."""
    compute = Compute.of(cfg.device, cfg.precision)  # a missing GPU fails before any work
    target, t_manifest = zoo.load(cfg.target)
    all_cloned = [c for s in cfg.sources for c in s.classes]
    clash = set(all_cloned) & set(t_manifest.label_names)
    if clash:
        raise InvalidInputError(
            f"class(es) {sorted(clash)} are already predicted by target {t_manifest.name}")
    checked = []
    for spec in cfg.sources:  # every check before any expensive step
        source, s_manifest = zoo.load(spec.source)
        missing = [c for c in spec.classes if c not in s_manifest.label_names]
        if missing:
            raise InvalidInputError(
                f"class(es) {missing} are not in source {s_manifest.name} (its labels: "
                f"{', '.join(s_manifest.label_names)})")
        check_input_shapes(t_manifest, s_manifest, data)
        candidates = list(cfg.positions or default_candidates(target.num_blocks, source.num_blocks))
        check_candidates(candidates, target.num_blocks, source.num_blocks)
        _data_indices(data, [*spec.classes, *t_manifest.label_names], "cloned or target")
        checked.append((spec, source, s_manifest, candidates))
    cfg = with_batch_cap(cfg, [(target, t_manifest), *((s, sm) for _, s, sm, _ in checked)])
    synthetic = None
    if cfg.synthesize:  # without target data, twice as many: half of them validate
        default = SynthesizeConfig()
        syn = replace(default, per_class=default.per_class * (1 if cfg.target_per_class else 2),
                      batch_size=min(default.batch_size, cfg.batch_size or default.batch_size))
        synthetic = cached_target_samples(
            target, t_manifest.sha256, len(t_manifest.label_names),
            tuple(t_manifest.input_shape), syn, cfg.seed, compute)
    modules = []
    for spec, source, s_manifest, candidates in checked:
        others = [c for c in all_cloned if c not in spec.classes]
        modules.append(ModuleJob(
            on_device(source, compute), s_manifest,
            tuple(s_manifest.label_names.index(c) for c in spec.classes),
            spec.classes,
            _clone_data(data, spec.classes, t_manifest.label_names, cfg, others, synthetic),
            candidates))
    return CloneJob(cfg, on_device(target, compute), t_manifest, modules, compute)


def with_batch_cap(cfg: CloneConfig, models: list[tuple[ZooNet, Manifest]]) -> CloneConfig:
    """``cfg`` with every step's batch lowered to what the activation budget allows
    (``memory.batch_cap``, ``$PNC_ACTIVATION_BUDGET``) when the user set no batch size.

    The MNIST zoo's cap is far above the largest default batch, so its clones are
    unchanged; a resnet50 at 224x224 gets batches of 12 and clones in bounded
    memory (``bench/bench_large_model.py``). The cap a clone ran with is in its report's settings (``batch_size``).
    """
    if cfg.batch_size is not None:
        return cfg
    budget = activation_budget()
    cap = min(batch_cap([model], manifest.input_shape, budget) for model, manifest in models)
    return cfg.with_batch_size(cap) if cap < LARGEST_DEFAULT_BATCH else cfg


# ----------------------------------------------------------------------------- steps


def localize_module(job: CloneJob, i: int) -> dict[str, torch.Tensor]:
    """Masks of the source part that serves module ``i``'s cloned classes."""
    m = job.modules[i]
    return localize(m.source, m.data.x_new, m.data.y_new, m.cloned, job.cfg.localize, job.cfg.seed,
                    job.compute)


def prepare_module(job: CloneJob, i: int) -> Prepared:
    """Module ``i``'s candidate-independent training tensors (``insert.prepare``)."""
    m = job.modules[i]
    augment, checks = augment_transforms(job.cfg.insert, m.data.x_new.shape[1],
                                         augment_judges(job.target, m.source, m.data, m.cloned),
                                         job.cfg.seed, job.compute)
    prepared = prepare(m.source, m.data, job.cfg.insert, job.cfg.seed, job.compute, augment)
    prepared.augment_checks = checks
    return prepared


def train_position(job: CloneJob, i: int, position: tuple[int, int]) -> tuple[Branch, dict]:
    """Train and score one candidate of module ``i`` (needs its masks and prepared data)."""
    m = job.modules[i]
    assert m.masks is not None and m.prepared is not None, "localize the module first"
    return insert_candidate(job.target, m.source, job.target_labels, job.input_shape, position,
                            m.masks, m.cloned, m.cloned_labels, m.data, m.prepared,
                            job.cfg.insert, job.cfg.seed, job.compute)


CandidateRunner = Callable[[CloneJob, int, list[tuple[int, int]]], list[tuple[Branch, dict]]]
Localizer = Callable[[CloneJob], list[tuple[dict[str, torch.Tensor], Prepared]]]


def localize_sequential(job: CloneJob) -> list[tuple[dict[str, torch.Tensor], Prepared]]:
    """Masks and prepared data of every module, one after another."""
    return [(localize_module(job, i), prepare_module(job, i)) for i in range(len(job.modules))]


def run_sequential(job: CloneJob, i: int, positions: list[tuple[int, int]],
                   on_result: Callable[[tuple[int, int], dict], None] | None = None,
                   ) -> list[tuple[Branch, dict]]:
    """The default ``CandidateRunner``: ``positions`` of module ``i`` in turn, in process."""
    out = []
    for pos in positions:
        out.append(train_position(job, i, pos))
        if on_result:
            on_result(pos, out[-1][1])
    return out


def make_package(job: CloneJob, branches: list[Branch], report: dict) -> tuple[Package, Superbody]:
    """The package of the chosen branches (one per module) and the superbody it rebuilds.

    Both are on the CPU (the branches come back from the job's device), so the
    fingerprint is what a receiver's CPU computes."""
    superbody = Superbody(job.target, job.target_labels, branches).eval()
    if not job.compute.is_cpu:
        superbody.cpu()
    modules = []
    for m, b in zip(job.modules, branches):
        assert m.masks is not None, "localize the module first"
        modules.append(ClonedModule(
            ZooRef.of(m.manifest), m.cloned, b.position_r, b.position_s,
            {k: v.clone() for k, v in m.masks.items()}, branch_tensors(b),
            branch_config(b)))
    package = Package(
        target=ZooRef.of(job.target_manifest), modules=modules,
        label_names=superbody.label_names, fingerprint=fingerprint_of(superbody, job.input_shape),
        report=report, created_unix_s=time.time(), writer_version=__version__)
    return package, superbody


def clone(zoo: Zoo, data: Dataset, cfg: CloneConfig,
          runner: CandidateRunner | None = None,
          log: Callable[[str], None] | None = None,
          localizer: Localizer | None = None) -> CloneResult:
    """Clone ``cfg.sources``' classes into ``cfg.target``; nothing writes to the zoo.

    ``runner`` trains a list of candidate positions (default: in order, in
    process) and ``localizer`` localizes every source (default: in order);
    ``pnc_net.cluster`` provides both backed by Ray actors.
    """
    started = time.perf_counter()
    say = log or (lambda _msg: None)
    job = plan(zoo, data, cfg)
    cfg = job.cfg  # with the batch cap plan() may have set
    for m, (masks, prepared) in zip(job.modules, (localizer or localize_sequential)(job)):
        m.masks, m.prepared = masks, prepared
    say(f"localized {len(job.modules)} source(s) in {time.perf_counter() - started:.1f}s")
    branches, searches, joint = [], [], []
    for i, m in enumerate(job.modules):
        assert m.masks is not None  # set just above
        kept = sum(int(v.sum()) for v in m.masks.values())
        total = sum(v.numel() for v in m.masks.values())
        say(f"{m.manifest.name}: kept {kept}/{total} filters; "
            f"searching {len(m.candidates)} positions ({cfg.search})")
        position, branch, record = search_module(job, i, runner or run_sequential)
        say(f"{m.manifest.name}: best position R={position[0]} S={position[1]}")
        if cfg.insert.joint_rounds:
            score = next(r["score"] for r in record if r["position"] == list(position))
            branch, rounds = joint_refine(job, i, position, branch, float(score))
            joint.append(rounds)
            say(f"{m.manifest.name}: joint refinement kept {sum(r['kept'] for r in rounds)} "
                f"of {len(rounds)} round(s)")
        if cfg.insert.gate_views and isinstance(branch.gate, DiscriminantGate):
            branch.gate.views = cfg.insert.gate_views  # the search scored the branch without
            branch.gate.view_transforms = m.prepared.augment if m.prepared else ()
        branches.append(branch)
        searches.append(record)
    augment = [{"transforms": list(m.prepared.augment), "checks": m.prepared.augment_checks or {}}
               for m in job.modules if m.prepared is not None]
    report: dict[str, Any] = {"settings": settings_of(cfg), "search": searches, "augment": augment,
                              **({"joint_refinement": joint} if joint else {})}
    package, superbody = make_package(job, branches, report)
    metrics = clone_metrics(on_device(superbody, job.compute), data,
                            [(m.source, m.manifest.label_names) for m in job.modules],
                            cfg.eval_batch_size, job.compute)
    report.update(metrics=metrics, seconds=time.perf_counter() - started)
    package.report = report
    return CloneResult(package, superbody, report)


def joint_refine(job: CloneJob, i: int, position: tuple[int, int], branch: Branch,
                 score: float) -> tuple[Branch, list[dict]]:
    """Joint refinement (method.md step 4) of module ``i``'s chosen branch.

    With ``(R, S)`` fixed, each round refines the masks of the source's tail through the
    inserted path (``localize.refine_through_branch``: fed the trained adapter's output,
    not the source's own features) and retrains the adapter and gate on the new masks.
    A round is kept only when the validation score does not fall, so the rounds can
    only help on validation; the first that does not help ends them. Returns the branch
    and one record per round (score, filters kept in the tail, kept or not).
    """
    m = job.modules[i]
    assert m.masks is not None and m.prepared is not None, "localize the module first"
    r, s = position
    work = copy.deepcopy(m.source).eval()  # set_gates writes to the modules: a private copy
    units = units_after(work, s, job.input_shape)
    if not units:  # nothing masked after S: the branch is what it is
        return branch, []
    is_new = m.prepared.y >= 0
    h_r = predict_logits(lambda xb: job.target.forward_features(xb, r), m.prepared.x[is_new],
                         job.cfg.eval_batch_size, compute=job.compute)
    gen = torch.Generator().manual_seed(job.cfg.seed * 7919 + r * 31 + s)
    rounds: list[dict] = []
    for k in range(job.cfg.insert.joint_rounds):
        u = _adapter_outputs(work, branch, h_r, s, m.masks, job)
        masks = refine_through_branch(work, s, units, u, m.prepared.z_src[is_new],
                                      torch.tensor(m.cloned), m.masks, job.cfg.localize, gen,
                                      job.compute)
        record = {"round": k, "score_before": score, "score": score, "kept": False,
                  "tail_filters_before": sum(int(m.masks[n].sum()) for n in units),
                  "tail_filters": sum(int(masks[n].sum()) for n in units)}
        rounds.append(record)
        if all(torch.equal(masks[n], m.masks[n]) for n in units):
            record["unchanged"] = True  # nothing to retrain: the rounds have converged
            break
        old_masks, m.masks = m.masks, masks
        try:
            new_branch, result = train_position(job, i, position)
        except IncompatibleError:  # the new masks change what boundary S carries
            new_branch, result = branch, {"score": -1.0}
        record.update(score=float(result["score"]), kept=float(result["score"]) >= score)
        if not record["kept"]:
            m.masks = old_masks
            break
        branch, score = new_branch, float(result["score"])
    return branch, rounds


def _adapter_outputs(source: ZooNet, branch: Branch, h_r: torch.Tensor, position_s: int,
                     masks: dict[str, torch.Tensor], job: CloneJob) -> torch.Tensor:
    """What the branch feeds the source's tail, at the tail's full width: the adapter's
    output on ``h_r`` with the channels the masks drop at S as zeros (on the CPU)."""
    u = predict_logits(branch.adapter, h_r, job.cfg.eval_batch_size, compute=job.compute)
    with torch.no_grad():
        like = source.forward_features(
            torch.zeros(1, *job.input_shape, device=next(source.parameters()).device),
            position_s)
    if like.shape[1:] == u.shape[1:]:
        return u
    _, _, keep = source.pruned_tail(position_s, masks)
    full = torch.zeros(len(u), *like.shape[1:])
    full[:, keep] = u
    return full


def searched_branch(job: CloneJob, i: int = 0) -> tuple[tuple[int, int], Branch]:
    """Module ``i`` localized, prepared and searched in process, as ``clone`` does, but
    not packaged: ``(position, branch)`` (in eval mode) for experiments that refit a part
    of a finished clone (``bench/bench_lda_gate.py``, ``bench/bench_rgb_router.py``)."""
    module = job.modules[i]
    module.masks, module.prepared = localize_module(job, i), prepare_module(job, i)
    position, branch, _ = search_module(job, i, run_sequential)
    return position, branch.eval()


@torch.no_grad()
def router_features(target: ZooNet, branch: Branch, x: torch.Tensor,
                    batch_size: int = 256) -> dict[str, torch.Tensor]:
    """What a router could read of inputs ``x``, for the router experiments: the target's
    logits ``z_t`` and penultimate features ``f_t``, its features pooled at every boundary
    ``taps`` (in boundary order), and the branch's logits ``z_s`` and features ``f_b``."""
    keys = ("z_t", "f_t", "z_s", "f_b", "taps")
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    for i in range(0, len(x), batch_size):
        h, taps = x[i : i + batch_size], []
        for b in range(target.num_blocks):
            h = target.block(b)(h)
            taps.append(target.pooled(h, b + 1))
        f_t = target.head.features(h)
        z_s, f_b = branch.run(target.forward_features(x[i : i + batch_size], branch.position_r))
        for k, v in zip(keys, (target.head.fc(f_t), f_t, z_s, f_b, torch.cat(taps, 1))):
            parts[k].append(v.float())
    return {k: torch.cat(v) for k, v in parts.items()}


def search_module(job: CloneJob, i: int, runner: CandidateRunner,
                  ) -> tuple[tuple[int, int], Branch, list[dict]]:
    """``(best position, its branch, the report's search list)`` of module ``i``.

    ``exhaustive`` trains every candidate at the full budget. ``halving`` trains
    them in rungs of growing budget (``search.successive_halving``); a rung's
    runner sees a copy of the job whose ``cfg.insert`` has the rung's epochs and
    gate steps, so any ``CandidateRunner`` (the Ray one ships ``job.cfg`` to
    its workers) trains at the rung's budget unchanged. Each record says the
    last rung a candidate reached and its score at every rung, so a report shows
    what was pruned.
    """
    candidates = job.modules[i].candidates
    if job.cfg.search == "exhaustive":
        results = runner(job, i, candidates)
        best = best_candidate([(p, r) for p, (_, r) in zip(candidates, results)])
        return (candidates[best], results[best][0],
                [{"position": list(p), **r} for p, (_, r) in zip(candidates, results)])

    def train(positions: list[tuple[int, int]], budget: float) -> list[tuple[Branch, dict]]:
        insert = rung_insert_config(job.cfg.insert, budget)
        rung_job = job if insert == job.cfg.insert else replace(
            job, cfg=replace(job.cfg, insert=insert))
        return runner(rung_job, i, positions)

    halving = successive_halving(candidates, train, score=lambda r: float(r[1]["score"]))
    position, (branch, _) = halving.best
    records: dict[tuple[int, int], dict] = {}
    for k, rung in enumerate(halving.rungs):
        for p, (_, r) in zip(rung.candidates, rung.results):
            prev = records.get(p, {}).get("rung_scores", [])
            records[p] = {"position": list(p), **r, "rung": k, "budget": rung.budget,
                          "rung_scores": [*prev, r["score"]]}
    return position, branch, [records[p] for p in candidates]


def settings_of(cfg: CloneConfig) -> dict:
    """The settings a package's report records (JSON-ready)."""
    return {"target": cfg.target, "sources": [[s.source, list(s.classes)] for s in cfg.sources],
            "per_class": cfg.per_class, "target_per_class": cfg.target_per_class,
            "seed": cfg.seed, "adapter_rank": cfg.insert.adapter_rank,
            **({"joint_rounds": cfg.insert.joint_rounds} if cfg.insert.joint_rounds else {}),
            **({"gate_stand_ins": cfg.insert.gate_stand_ins}
               if cfg.insert.gate_stand_ins is not None else {}),
            **({"gate_log_odds": cfg.insert.gate_log_odds} if cfg.insert.gate_log_odds else {}),
            **({"gate_views": cfg.insert.gate_views} if cfg.insert.gate_views else {}),
            **({"augment": cfg.insert.augment} if cfg.insert.augment != "auto" else {}),
            "synthetic_target_samples": cfg.synthesize,
            **({"batch_size": cfg.batch_size} if cfg.batch_size else {}),
            **({"search": cfg.search} if cfg.search != "exhaustive" else {}),
            **({"device": cfg.device} if cfg.device != "cpu" else {}),
            **({"precision": cfg.precision} if cfg.precision != "fp32" else {})}


