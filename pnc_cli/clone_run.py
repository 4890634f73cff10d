"""Running one clone for ``pnc clone`` and ``pnc demo``: the config, the runner, the job.

Heavy (torch, the clone pipeline): the commands import it inside their bodies, so
``pnc --help`` and the edge client never load it. Imports point one way: ``core``
and ``demo`` use this module, and it uses neither.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from pnc_cli.common import RAY_LOCAL, err_console, split_labels
from pnc_net.cloning import CloneConfig, CloneResult, SourceSpec, clone, run_sequential
from pnc_net.data import Dataset, load_dataset
from pnc_net.devices import Compute
from pnc_net.errors import InvalidInputError
from pnc_net.insert import InsertConfig
from pnc_net.search import parse_positions
from pnc_net.zoo import Zoo


def clone_config(target: str, sources: Sequence[str], classes: Sequence[str], *,
                 per_class: int, target_per_class: int, seed: int, positions: str | None,
                 adapter_rank: int, batch_size: int | None = None,
                 search: str = "exhaustive", device: str = "cpu",
                 precision: str = "fp32", gate: str = "auto", joint_rounds: int = 0,
                 gate_taps: str = "auto", gate_features: str = "half",
                 gate_stand_ins: bool | None = None, gate_log_odds: float = 0.0,
                 augment: str = "auto", gate_views: int = 0) -> CloneConfig:
    """``pnc clone``'s flags as a ``CloneConfig``; a mistake raises before any work.

    ``device`` is resolved here (``auto`` becomes what this machine has), so the
    package's report names the device that ran, and a missing GPU is one error line
    before anything is read or written."""
    compute = Compute.of(device, precision)
    if len(classes) != len(sources):
        raise InvalidInputError(
            f"give one --classes per --source ({len(sources)} sources, {len(classes)} --classes)")
    return CloneConfig(
        target=target,
        sources=tuple(SourceSpec(s, split_labels(c)) for s, c in zip(sources, classes)),
        per_class=per_class, target_per_class=target_per_class, seed=seed,
        positions=tuple(parse_positions(positions)) if positions else None,
        insert=InsertConfig(adapter_rank=adapter_rank, gate=gate, joint_rounds=joint_rounds,
                            gate_taps=gate_taps, gate_features=gate_features,
                            gate_stand_ins=gate_stand_ins, gate_log_odds=gate_log_odds,
                            augment=augment, gate_views=gate_views),
        search=search,
        device=compute.device, precision=compute.precision,
    ).with_batch_size(batch_size)


def tqdm_runner(enabled: bool) -> Callable[..., Any]:
    """A sequential candidate runner with a progress bar per source.

    The bar is created when the search starts, not before: a user mistake that
    planning rejects must print its one error line and nothing else.
    """

    def runner(job, i, positions):
        bar = tqdm(total=len(positions), desc=f"position search {job.modules[i].manifest.name}",
                   disable=not enabled, leave=False)

        def on_result(pos, res):
            bar.set_postfix_str(f"R={pos[0]} S={pos[1]} score={res['score']:.3f}")
            bar.update(1)
        try:
            return run_sequential(job, i, positions, on_result)
        finally:
            bar.close()
    return runner


@contextmanager
def ray_runner(address: str | None) -> Iterator[Any]:
    """A Ray candidate runner for ``--ray [ADDRESS]``, or None (in process) without it."""
    if address is None:
        yield None
        return
    from pnc_net.cluster import make_ray_runner

    with make_ray_runner(None if address == RAY_LOCAL else address) as runner:
        yield runner


def run_clone(cfg: CloneConfig, *, data: Path | None, zoo_dir: Path | None, quiet: bool,
              runner: Any = None) -> tuple[CloneResult, Zoo, Dataset]:
    """Clone ``cfg`` from the zoo on ``data`` (None: embedded MNIST); returns
    (result, zoo, dataset). ``runner`` None searches in process with a progress bar."""
    zoo, dataset = Zoo(zoo_dir), load_dataset(data)
    torch.manual_seed(cfg.seed)
    runner = runner or tqdm_runner(not quiet)
    log = None if quiet else (lambda msg: err_console.print(f"[dim]{msg}[/]", highlight=False))
    localizer = getattr(runner, "localize_all", None)  # Ray runners localize in parallel too
    result = clone(zoo, dataset, cfg, runner=runner, log=log, localizer=localizer)
    return result, zoo, dataset
