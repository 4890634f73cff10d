"""Batch clone jobs on a Ray cluster: a spec of tasks in, packages out.

Run on a cluster (``docs/cluster.md``)::

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m pnc_net.jobs bench/specs/small.yaml --store /srv/pnc/packages

A spec is a YAML or JSON list of clone tasks, or a mapping with ``tasks`` (and
optionally ``zoo``, ``data`` and ``defaults`` for every task)::

    - name: cnn-5-6
      target: mnist-cnn-0to4
      source: mnist-cnn-5to9
      classes: [5, 6]
      positions: ["3:3", "4:4"]      # optional; default: depth-matched pairs
    - target: mnist-resnet-0to4
      sources: [{source: mnist-resnet-5to9, classes: "7,8"}]

Every task runs on the cluster through ``pnc_net.cluster.RayRunner`` (one pool
of workers for the whole spec, zoo weights shipped once). A task whose spec,
zoo reference or data is bad fails alone: its error goes into its JSON line
and the summary, and the others run. Packages are kept outside Ray (jobs die
with the cluster): written to a package store folder or published to a sender.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

from pnc_net import wire
from pnc_net.cloning import CloneConfig, CloneResult, SourceSpec, clone
from pnc_net.cluster import make_ray_runner
from pnc_net.data import Dataset, load_dataset
from pnc_net.errors import ExitCode, InvalidInputError, NotFoundError, PncError, PreconditionError
from pnc_net.insert import InsertConfig
from pnc_net.search import parse_positions
from pnc_net.tables import render
from pnc_net.zoo import Zoo

__all__ = ["clone_on_cluster", "load_spec", "main", "make_ray_runner", "run_batch"]
log = logging.getLogger(__name__)
EXIT_TASKS_FAILED = ExitCode.TASKS_FAILED


def _labels(value: Any) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else value
    labels = tuple(str(c).strip() for c in items if str(c).strip()) if isinstance(
        items, list | tuple) else ()
    if not labels:
        raise ValueError(f"classes must be a list or 'a,b', got {value!r}")
    return labels


def _positions(value: Any) -> tuple[tuple[int, int], ...]:
    text = value if isinstance(value, str) else ",".join(str(v) for v in value)
    try:
        return tuple(parse_positions(text))
    except InvalidInputError as err:
        raise ValueError(str(err)) from None


Labels = Annotated[tuple[str, ...], BeforeValidator(_labels)]
Positions = Annotated[tuple[tuple[int, int], ...], BeforeValidator(_positions)]


class SourceEntry(BaseModel):
    """One item of a task's ``sources`` list."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    source: StrictStr
    classes: Labels


class TaskEntry(BaseModel):
    """One task as the spec file gives it; types and bounds checked by pydantic."""

    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)
    name: str | None = None
    data: str | None = None
    target: str
    source: str | None = None
    classes: Labels | None = None
    sources: tuple[SourceEntry, ...] | None = None
    per_class: StrictInt = 100
    target_per_class: StrictInt = 20
    seed: StrictInt = 0
    positions: Positions | None = None
    adapter_rank: StrictInt = 16
    dtype: Literal["fp32", "fp16", "int8"] = "fp16"

    @model_validator(mode="after")
    def _one_way_to_name_sources(self) -> TaskEntry:
        if self.sources is None and (self.source is None or self.classes is None):
            raise ValueError("give 'source' and 'classes', or 'sources'")
        return self

    def task(self, index: int) -> TaskSpec:
        """The ``TaskSpec`` (a validated ``CloneConfig``) this entry describes."""
        sources = tuple(SourceSpec(s.source, s.classes) for s in self.sources) if (
            self.sources is not None) else (SourceSpec(str(self.source), self.classes or ()),)
        config = CloneConfig(
            target=self.target, sources=sources, per_class=self.per_class,
            target_per_class=self.target_per_class, seed=self.seed, positions=self.positions,
            insert=InsertConfig(adapter_rank=self.adapter_rank))
        return TaskSpec(self.name or f"{index}-{config.target}", config, self.dtype, self.data)


@dataclass(frozen=True)
class TaskSpec:
    """One clone task of a batch spec."""

    name: str
    config: CloneConfig
    dtype: str = "fp16"
    data: str | None = None  # an .npz; None = the spec's data (default: embedded MNIST)


@dataclass(frozen=True)
class BatchSpec:
    """A parsed spec: tasks (or the error that makes each unusable) and shared settings."""

    tasks: tuple[TaskSpec | PncError, ...]
    names: tuple[str, ...]
    zoo: str | None = None
    data: str | None = None


def parse_task(raw: Any, index: int, defaults: dict | None = None) -> TaskSpec:
    """A ``TaskSpec`` from one list item, or ``InvalidInputError`` saying what is wrong."""
    if not isinstance(raw, dict):
        raise InvalidInputError(f"task {index}: expected a mapping of settings, got {raw!r}")
    raw = {**(defaults or {}), **raw}
    where = f"task {index} ({raw['name']})" if "name" in raw else f"task {index}"
    try:
        return TaskEntry.model_validate(raw).task(index)
    except ValidationError as err:
        raise InvalidInputError(f"{where}: {_first_problem(err)}") from None
    except InvalidInputError as err:  # CloneConfig's own checks
        raise InvalidInputError(f"{where}: {err}") from None


def _first_problem(err: ValidationError) -> str:
    """pydantic's first error in the words of the spec's author."""
    e = err.errors()[0]
    loc = [str(p) for p in e["loc"]]
    kind, value = e["type"], e.get("input")
    if loc and loc[0] == "sources" and len(loc) > 1:
        return f"each item of 'sources' needs 'source' and 'classes', got {value!r}"
    if kind == "missing":
        return f"'{loc[-1]}' is missing"
    if kind == "extra_forbidden":
        unknown = sorted(str(x["loc"][-1]) for x in err.errors() if x["type"] == kind)
        return f"unknown setting(s) {unknown}; known: {sorted(TaskEntry.model_fields)}"
    if kind.startswith("int_"):
        return f"{loc[-1]} must be an integer, got {value!r}"
    if kind == "literal_error":
        return f"{loc[-1]} {value!r} is not one of {', '.join(wire.WIRE_DTYPES)}"
    return e["msg"].removeprefix("Value error, ")


def load_spec(path: str | Path) -> BatchSpec:
    """Read a YAML/JSON spec. A malformed file is an error; a malformed task is kept as one."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise NotFoundError(f"spec {path} does not exist") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise InvalidInputError(f"spec {path} is not readable YAML/JSON: "
                                f"{str(err).splitlines()[0]}") from None
    top = raw if isinstance(raw, dict) else {"tasks": raw}
    items, defaults = top.get("tasks"), top.get("defaults") or {}
    if not isinstance(items, list) or not items or not isinstance(defaults, dict):
        raise InvalidInputError(
            f"spec {path} must be a non-empty list of tasks or a mapping with 'tasks'")
    tasks: list[TaskSpec | PncError] = []
    names: list[str] = []
    for i, item in enumerate(items):
        try:
            task = parse_task(item, i, defaults)
            tasks.append(task)
            names.append(task.name)
        except PncError as err:
            tasks.append(err)
            names.append(str(item.get("name", i)) if isinstance(item, dict) else str(i))
    return BatchSpec(tuple(tasks), tuple(names), top.get("zoo"), top.get("data"))


# ----------------------------------------------------------------------------- sinks


def store_sink(folder: str | Path) -> Callable[[bytes], dict]:
    """Write packages into a package store folder (``pnc_net.serve.store.PackageStore``)."""
    from pnc_net.serve.store import PackageStore

    store = PackageStore(folder)

    def put(data: bytes) -> dict:
        pid = store.put(data)
        return {"stored": str(store.packages_dir / f"{pid}.pnc")}
    return put


def publish_sink(address: str, token: str | None = None) -> Callable[[bytes], dict]:
    """Send packages to a sender daemon at ``HOST:PORT`` (``pnc_net.serve.client.PncClient``)."""
    from pnc_net.serve.client import PncClient

    client = PncClient(address, token)
    status = client.health()  # fail before any cloning, not after each task
    if status != "SERVING":
        raise PreconditionError(f"the sender at {address} is {status}; start it or wait")

    def send(data: bytes) -> dict:
        client.send_package(data)
        return {"published": address}
    return send


# ----------------------------------------------------------------------------- running


def clone_on_cluster(zoo: Zoo, data: Dataset, cfg: CloneConfig, runner) -> CloneResult:
    """``clone`` with localization and candidate positions on the Ray workers."""
    return clone(zoo, data, cfg, runner=runner, localizer=runner.localize_all)


def _error_text(err: BaseException) -> str:
    cause = getattr(err, "cause", None)  # a RayTaskError carries the worker's exception
    err = cause if isinstance(cause, BaseException) else err
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def run_task(task: TaskSpec | PncError, name: str, zoo: Zoo,
             data: Callable[[str | None], Dataset], runner,
             sink: Callable[[bytes], dict]) -> dict:
    """One task's JSON record; any failure is caught and reported, never raised."""
    started = time.perf_counter()
    record = {"task": name, "ok": False}
    try:
        if isinstance(task, PncError):
            raise task
        result = clone_on_cluster(zoo, data(task.data), task.config, runner)
        blob = wire.encode(result.package, task.dtype)
        m = result.report["metrics"]
        record.update(
            ok=True, package_id=wire.package_id(blob), package_bytes=len(blob), **sink(blob),
            position=[[b.position_r, b.position_s] for b in result.superbody.branches],
            **{k: m.get(k) for k in ("acc_old", "acc_new", "locality")})
    except Exception as err:  # noqa: BLE001 - one task's failure must not stop the others
        record["error"] = _error_text(err)
        log.warning("task %s failed: %s", name, record["error"])
    record["seconds"] = round(time.perf_counter() - started, 2)
    return record


def summary_table(records: list[dict]) -> str:
    """One row per task, as plain text for the job's log."""
    rows = [(r["task"], "yes" if r["ok"] else "NO",
             " ".join(f"{p[0]}:{p[1]}" for p in r.get("position", [])) or "-",
             f"{r['acc_new']:.3f}" if r.get("acc_new") is not None else "-",
             f"{r['locality']:.3f}" if r.get("locality") is not None else "-",
             f"{r['seconds']:.1f}",
             r.get("stored") or r.get("published") or r.get("error", "")) for r in records]
    return render(("task", "ok", "position", "acc_new", "locality", "seconds",
                   "package / error"), rows)


def run_batch(spec: BatchSpec, zoo: Zoo, runner, sink: Callable[[bytes], dict],
              emit: Callable[[dict], None] = lambda r: None) -> list[dict]:
    """Run every task in order on ``runner``; ``emit`` gets each record as it finishes."""
    datasets: dict[str | None, Dataset] = {}

    def data(path: str | None) -> Dataset:  # each data file loaded once, when first needed
        path = path or spec.data
        if path not in datasets:
            datasets[path] = load_dataset(path)
        return datasets[path]

    records = []
    for task, name in zip(spec.tasks, spec.names):
        records.append(run_task(task, name, zoo, data, runner, sink))
        emit(records[-1])
    return records


def main(argv: list[str] | None = None) -> int:
    """``python -m pnc_net.jobs SPEC --store DIR``: run a batch spec; the exit code."""
    parser = argparse.ArgumentParser(prog="python -m pnc_net.jobs", description=__doc__.split(
        "\n")[0])
    parser.add_argument("spec", help="YAML or JSON list of clone tasks")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--store", metavar="DIR", help="write packages into this folder")
    where.add_argument("--publish", metavar="HOST:PORT", help="send packages to a sender")
    parser.add_argument("--token", help="bearer token for --publish (default: none)")
    parser.add_argument("--zoo", help="zoo folder (default: the spec's 'zoo', then $PNC_ZOO)")
    parser.add_argument("--address", help="Ray address (default: $RAY_ADDRESS, else local)")
    parser.add_argument("--workers", type=int, help="CloneWorker actors (default: per GPU/CPU)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        spec = load_spec(args.spec)
        zoo = Zoo(args.zoo or spec.zoo)
        sink = store_sink(args.store) if args.store else publish_sink(args.publish, args.token)
        with make_ray_runner(args.address, args.workers) as runner:
            records = run_batch(spec, zoo, runner, sink, emit=lambda r: print(
                json.dumps(r, sort_keys=True, default=float), flush=True))
    except PncError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    print(summary_table(records), flush=True)
    failed = sum(not r["ok"] for r in records)
    print(f"{len(records) - failed}/{len(records)} task(s) succeeded", flush=True)
    return EXIT_TASKS_FAILED if failed else 0


if __name__ == "__main__":
    sys.exit(main())
