"""Cloning on a Ray cluster: ``CloneWorker`` actors and a runner for ``clone(...)``.

Ray is a thin shell here (``docs/cluster.md``; xgboost_ray's layout): the job
logic is ``pnc_net.cloning``'s steps; ``CloneWorker`` is a plain class that runs
one step for one module and can be used without Ray; the ``@ray.remote``
wrapper is a few lines, with its resources from ``ClusterConfig`` through
``.options()``. The driver ``ray.put``s each zoo model's weights once and every
module's data once; actors fetch a reference only on a cache miss (first use,
or after a restart), so a worker loads each zoo model once.

Every step is a pure function of its inputs and seeds, so a task that Ray
retries after its actor died gives the same answer, and the runner returns the
candidates in the order given: ``best_candidate`` reduces exactly as in process.

Example::

    from pnc_net.cluster import make_ray_runner
    with make_ray_runner() as runner:            # a local cluster, one worker per CPU
        result = clone(zoo, data, cfg, runner=runner)
"""

from __future__ import annotations

import dataclasses
import logging
import os
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Self

import torch
from safetensors.torch import save as save_safetensors

from pnc_net.cloning import (
    CloneConfig,
    CloneJob,
    ModuleJob,
    localize_module,
    prepare_module,
    train_position,
)
from pnc_net.devices import Compute, gpu_ids_device, resolve_device
from pnc_net.errors import IntegrityError, InvalidInputError, PreconditionError
from pnc_net.fsutil import sha256_bytes
from pnc_net.insert import CloneData, Prepared
from pnc_net.models import ZooNet
from pnc_net.package import ClonedModule, ZooRef
from pnc_net.rebuild import branch_config, branch_from_module, branch_tensors
from pnc_net.superbody import Branch
from pnc_net.zoo import Manifest, model_from_weights

PAYLOAD_CACHE = 8  # module shards an actor keeps (a few KB to a few MB each)


@dataclass(frozen=True)
class ClusterConfig:
    """Where to run and how many workers (``pnc clone --ray``'s settings).

    ``address=None`` joins ``$RAY_ADDRESS`` if set, else starts a local cluster
    (the embedded default). ``num_workers=None`` means one per GPU when the
    cluster has GPUs, else one per CPU slot.
    """

    address: str | None = None
    num_workers: int | None = None
    use_gpu: bool | None = None  # None: use GPUs when the cluster has them
    gpus_per_worker: float = 1.0  # < 1 packs several workers on one GPU (small models)
    torch_threads: int = 1  # intra-op threads per worker; 1 = one core per CPU worker
    max_restarts: int = 2
    max_task_retries: int = 2
    local_num_cpus: int | None = None  # CPUs of a cluster started here (None: all)

    def __post_init__(self) -> None:
        if self.num_workers is not None and self.num_workers < 1:
            raise InvalidInputError(f"--workers must be at least 1, got {self.num_workers}")
        if self.torch_threads < 1:
            raise InvalidInputError(f"torch_threads must be at least 1, got {self.torch_threads}")
        if not 0 < self.gpus_per_worker <= 1:
            raise InvalidInputError(f"gpus_per_worker must be in (0, 1], got {self.gpus_per_worker}")
        if self.max_restarts < 0 or self.max_task_retries < 0:
            raise InvalidInputError("max_restarts and max_task_retries must be >= 0")


@dataclass(frozen=True)
class WorkerResources:
    """What one ``CloneWorker`` asks the scheduler for."""

    num_cpus: float
    num_gpus: float

    @classmethod
    def for_cluster(cls, cfg: ClusterConfig, resources: dict[str, float]) -> tuple[
            WorkerResources, int]:
        """``(per-worker resources, worker count)``: one per GPU, else one per CPU slot."""
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
        if cfg.use_gpu and gpus == 0:
            raise PreconditionError("use_gpu is set but the Ray cluster has no GPU")
        if gpus and cfg.use_gpu is not False:
            per_gpu = max(1, int(1 / cfg.gpus_per_worker + 1e-9))
            return cls(num_cpus=1, num_gpus=cfg.gpus_per_worker), cfg.num_workers or gpus * per_gpu
        return cls(num_cpus=1, num_gpus=0), cfg.num_workers or max(1, cpus)

    def options(self, cfg: ClusterConfig) -> dict[str, Any]:
        """Keywords for ``ray.remote(...).options``: these resources plus the restart policy."""
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus,
                "max_restarts": cfg.max_restarts, "max_task_retries": cfg.max_task_retries}


@dataclass
class ModuleShard:
    """What a worker needs for one module of a job (a ``ModuleJob`` without models)."""

    cfg: CloneConfig
    target: Manifest
    source: Manifest
    cloned: tuple[int, ...]
    cloned_labels: tuple[str, ...]
    data: CloneData
    masks: dict[str, torch.Tensor] | None = None
    prepared: Prepared | None = None


def weights_bytes(model: ZooNet, manifest: Manifest) -> bytes:
    """The zoo file's bytes, re-serialized from the loaded model and checked by digest."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    data = save_safetensors(state, metadata={"arch": manifest.arch})
    if sha256_bytes(data) != manifest.sha256:
        raise IntegrityError(
            f"zoo model {manifest.name} in memory no longer matches its digest "
            f"{manifest.sha256[:12]}; reload it from the zoo")
    return data


def _resolve(value: Any) -> Any:
    """A value, or what an object reference points to (references travel nested)."""
    import ray

    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


def _to_device(obj: Any, device: str) -> Any:
    """Tensors inside dicts and dataclasses moved to ``device`` (a no-op on CPU)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type) and not isinstance(
            obj, CloneConfig):
        return dataclasses.replace(obj, **{f.name: _to_device(getattr(obj, f.name), device)
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


def actor_device() -> str:
    """The device of the Ray actor this runs in: its first GPU when Ray gave it any
    (``num_gpus`` > 0, so ``ray.get_gpu_ids()`` is not empty), else the CPU; the CPU
    outside Ray."""
    try:
        import ray
    except ImportError:
        return "cpu"
    if not ray.is_initialized():
        return "cpu"
    return gpu_ids_device(ray.get_gpu_ids())


class CloneWorker:
    """Runs clone steps for any module; caches zoo models and module shards.

    Arguments arrive as ``[ref]`` (a list, so Ray does not fetch them eagerly)
    or as plain values when used without Ray.

    The device comes from the worker's resources (``actor_device``) unless given.
    It is passed explicitly to every step (``CloneJob.compute``): the worker sets no
    process-wide default device and patches nothing, so its random draws are the
    CPU generators' (the same numbers as in process) and a GPU package differs
    from a CPU one only by the device's arithmetic.
    """

    def __init__(self, torch_threads: int = 1, device: str | None = None) -> None:
        torch.set_num_threads(torch_threads)
        self.device = resolve_device(device) if device else actor_device()
        self.models: dict[str, ZooNet] = {}
        self.shards: OrderedDict[str, ModuleShard] = OrderedDict()
        self.model_loads = 0

    def _model(self, manifest: Manifest, weights: dict[str, list]) -> ZooNet:
        if manifest.sha256 not in self.models:
            data = _resolve(weights[manifest.sha256][0])
            if sha256_bytes(data) != manifest.sha256:
                raise IntegrityError(f"weights received for {manifest.name} do not match "
                                     f"its digest {manifest.sha256[:12]}")
            # built here from the bytes: a private model, so moving it touches no zoo cache
            self.models[manifest.sha256] = model_from_weights(manifest, data).to(self.device)
            self.model_loads += 1
        return self.models[manifest.sha256]

    def _shard(self, key: str, shard: list) -> ModuleShard:
        if key not in self.shards:
            self.shards[key] = _resolve(shard[0])  # data stays on the CPU: batches move
            while len(self.shards) > PAYLOAD_CACHE:
                self.shards.popitem(last=False)
        self.shards.move_to_end(key)
        return self.shards[key]

    def _job(self, key: str, shard: list, weights: dict[str, list]) -> CloneJob:
        s = self._shard(key, shard)
        module = ModuleJob(self._model(s.source, weights), s.source, s.cloned, s.cloned_labels,
                           s.data, [], s.masks, s.prepared)
        return CloneJob(s.cfg, self._model(s.target, weights), s.target, [module],
                        self.compute(s.cfg))

    def compute(self, cfg: CloneConfig) -> Compute:
        """This worker's device with the job's precision (bf16 only where it can run)."""
        return Compute(self.device, cfg.precision if self.device.startswith("cuda") else "fp32")

    def localize(self, key: str, shard: list, weights: dict[str, list],
                 ) -> tuple[dict[str, torch.Tensor], Prepared]:
        """Masks and prepared tensors of one module (``clone.localize_module``/``prepare_module``)."""
        job = self._job(key, shard, weights)
        masks, prepared = localize_module(job, 0), prepare_module(job, 0)
        return _to_device(masks, "cpu"), _to_device(prepared, "cpu")

    def train(self, key: str, shard: list, weights: dict[str, list],
              position: tuple[int, int]) -> tuple[dict[str, torch.Tensor], dict, dict]:
        """One candidate: ``(adapter+gate tensors, branch config, score dict)``."""
        branch, result = train_position(self._job(key, shard, weights), 0,
                                        (position[0], position[1]))
        config = branch_config(branch)
        tensors = {k: v.cpu() for k, v in branch_tensors(branch).items()}
        return tensors, config, result

    def info(self) -> dict:
        """Where and how this worker runs, how many zoo models it has loaded, and on a
        GPU the most memory torch has held there (bench/bench_devices.py reports it)."""
        out = {"pid": os.getpid(), "model_loads": self.model_loads, "device": self.device,
               "threads": torch.get_num_threads(),
               "default_device": str(torch.get_default_device())}  # never changed: cpu
        if self.device.startswith("cuda"):
            out["cuda_max_allocated"] = int(torch.cuda.max_memory_allocated(self.device))
        return out


def _remote_worker_class():
    import ray

    return ray.remote(CloneWorker)


def connect(cfg: ClusterConfig) -> bool:
    """Join or start a cluster; True when this call connected (and must disconnect)."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    try:
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:  # the embedded default: a one-node cluster on loopback
            ray.init(num_cpus=cfg.local_num_cpus or os.cpu_count(), include_dashboard=False,
                     _node_ip_address="127.0.0.1", logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise PreconditionError(
            f"cannot reach a Ray cluster at {address or 'a new local cluster'}: "
            f"{str(err).splitlines()[0] if str(err) else type(err).__name__}; "
            "start one with `ray start --head` or leave the address out") from None
    return True


class RayRunner:
    """A ``CandidateRunner`` (and localizer) backed by a pool of ``CloneWorker`` actors."""

    def __init__(self, cfg: ClusterConfig | None = None) -> None:
        import ray
        self.cfg = cfg or ClusterConfig()
        self._owns_connection = connect(self.cfg)
        self.resources, n = WorkerResources.for_cluster(self.cfg, ray.cluster_resources())
        remote = _remote_worker_class().options(**self.resources.options(self.cfg))
        # each actor takes its device from the GPUs Ray assigns it (CloneWorker.__init__)
        self.actors = [remote.remote(self.cfg.torch_threads) for _ in range(n)]
        self._weights: dict[str, Any] = {}  # sha256 -> ObjectRef, put once
        self._job: CloneJob | None = None  # the job whose shards are cached
        self._shards: dict[tuple[int, bool], tuple[str, Any]] = {}  # (i, masks?) -> key, ref
        self.submitted = 0  # tasks handed to workers so far (progress, tests)
        # called as each candidate finishes (in finishing order), e.g. to advance a progress bar
        self.on_result: Callable[[tuple[int, int], dict], None] | None = None

    # ------------------------------------------------------------------ object store
    def _weight_refs(self, job: CloneJob, i: int) -> dict[str, list]:
        import ray

        m = job.modules[i]
        for model, manifest in ((job.target, job.target_manifest), (m.source, m.manifest)):
            if manifest.sha256 not in self._weights:
                self._weights[manifest.sha256] = ray.put(weights_bytes(model, manifest))
        return {s: [self._weights[s]] for s in (job.target_manifest.sha256, m.manifest.sha256)}

    def _shard_ref(self, job: CloneJob, i: int) -> tuple[str, list]:
        """The module's data (and masks, once known) in the object store, put once."""
        import ray

        m = job.modules[i]
        if self._job is not job:  # a new job: forget the last one's shards
            self._job, self._shards = job, {}
        stage = (i, m.masks is not None)
        if stage not in self._shards:
            shard = ModuleShard(job.cfg, job.target_manifest, m.manifest, m.cloned,
                                m.cloned_labels, m.data, m.masks, m.prepared)
            self._shards[stage] = (uuid.uuid4().hex, ray.put(shard))
        key, ref = self._shards[stage]
        return key, [ref]

    # ------------------------------------------------------------------ steps
    def localize_all(self, job: CloneJob) -> list[tuple[dict[str, torch.Tensor], Prepared]]:
        """Localize and prepare every module at once, one module per worker."""
        args = [(*self._shard_ref(job, i), self._weight_refs(job, i)) for i in range(len(job.modules))]
        return self._fan_out("localize", args)

    def __call__(self, job: CloneJob, i: int, positions: list[tuple[int, int]],
                 ) -> list[tuple[Branch, dict]]:
        """Train ``positions`` of module ``i`` across the workers; results in the given order."""
        key, shard = self._shard_ref(job, i)
        weights = self._weight_refs(job, i)
        args = [(key, shard, weights, tuple(p)) for p in positions]
        def done(index: int, value: tuple) -> None:
            if self.on_result is not None:
                self.on_result((positions[index][0], positions[index][1]), value[2])

        return [(self._branch(job, i, pos, tensors, config), result)
                for pos, (tensors, config, result) in zip(
                    positions, self._fan_out("train", args, done))]

    def _fan_out(self, method: str, calls: list[tuple],
                 on_done: Callable[[int, Any], None] | None = None) -> list:
        """Results of ``actor.method(*args)`` for each call, in the order given.

        A worker that finishes takes the next call at once (Ray's ``ActorPool.map``
        would wait for results in order and leave it idle behind a slow candidate).
        A task whose worker died is retried by Ray on the restarted worker.
        """
        import ray

        free, queue = list(self.actors), list(enumerate(calls))
        pending: dict[Any, tuple[int, Any]] = {}  # object ref -> (call index, actor)
        results: list = [None] * len(calls)
        while queue or pending:
            while free and queue:
                index, args = queue.pop(0)
                actor = free.pop(0)
                pending[getattr(actor, method).remote(*args)] = (index, actor)
                self.submitted += 1
            (done,), _ = ray.wait(list(pending), num_returns=1)
            index, actor = pending.pop(done)
            results[index] = ray.get(done)
            free.append(actor)
            if on_done is not None:
                on_done(index, results[index])
        return results

    @staticmethod
    def _branch(job: CloneJob, i: int, pos: tuple[int, int], tensors: dict, config: dict,
                ) -> Branch:
        m = job.modules[i]
        assert m.masks is not None  # localized before any candidate trains
        module = ClonedModule(ZooRef.of(m.manifest), m.cloned, pos[0], pos[1], m.masks,
                              tensors, config)
        return branch_from_module(job.target, job.target_labels, job.input_shape, m.source,
                                  m.manifest.label_names, module)

    # ------------------------------------------------------------------ lifecycle
    def worker_info(self) -> list[dict]:
        """Every worker's ``CloneWorker.info`` (which process, device, model loads)."""
        import ray

        return ray.get([a.info.remote() for a in self.actors])

    def close(self) -> None:
        """Stop the workers; disconnect (stopping a cluster started here) if we connected."""
        import ray

        if not ray.is_initialized():
            return
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors, self._weights, self._job, self._shards = [], {}, None, {}
        if self._owns_connection:
            ray.shutdown()

    def __enter__(self) -> Self:
        """The runner itself; leaving the block closes it."""
        return self

    def __exit__(self, *exc: object) -> None:
        """``close()``, whether or not the block raised."""
        self.close()


def make_ray_runner(address: str | None = None, num_workers: int | None = None,
                    **kwargs) -> RayRunner:
    """A runner for ``clone(zoo, data, cfg, runner=...)``; close it (or use ``with``).

    ``address=None`` joins ``$RAY_ADDRESS`` or starts a local cluster; other
    ``ClusterConfig`` fields pass as keywords (``use_gpu``, ``torch_threads``...).
    """
    return RayRunner(ClusterConfig(address=address, num_workers=num_workers, **kwargs))
