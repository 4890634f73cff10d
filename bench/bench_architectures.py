"""The registry sweep: every torchvision classifier through GraphNet, as target and as source.

    python bench/bench_architectures.py                   # the whole registry (~1 h on 1 core)
    python bench/bench_architectures.py --models resnet18,densenet121 --out /tmp/a.json
    python bench/bench_architectures.py --resume          # skip models already in --out

Each model (``torchvision.models.list_models(module=torchvision.models)``) runs in
its own subprocess (``OMP_NUM_THREADS=1``, one torch thread) under
``--timeout-per-model``, so a hang, a crash or an out-of-memory kill costs one row,
never the sweep. The worker:

1. builds the model at random init (seed 0, 5 classes, BatchNorm affine terms
   randomized by ``pnc_net.testing``, as in the tests), finds its smallest valid input among ``SIZES`` (the
   first square size its forward accepts) and measures its BatchNorm statistics on
   8 random images of that size (``_calibrated``);
2. traces it (``graphnet.trace``), wraps it in a ``GraphNet`` (boundaries, mask
   units), checks the wrapped net equals the module, and checks *pruned == masked*
   (random masks, Torch-Pruning's pruned tail against the gated net) at up to four
   source boundaries, with ``atol = PRUNED_RTOL * max(1, max |masked|)`` as in
   ``tests/test_graphnet.py``;
3. runs two short clones through the library's own path (``Zoo.add_checkpoint`` of
   ``.pth`` files, ``cloning.clone`` with one candidate position, one epoch, a few
   random images): the model as target with a resnet18 source, and as source with a
   resnet18 target. Each package goes through ``wire.encode``/``decode``, is rebuilt
   and verified from a fresh ``Zoo`` (a receiver), and ``detach()`` must return the
   exact target (``torch.equal``) with the zoo weights unchanged.

Mechanics, not accuracy: the data are random images. One JSON row per model goes to
``--out`` (a list, rewritten after every model). Models with more than
``--max-params`` parameters get the checks of step 2 but not the clones (their row
says so). ``docs/architectures.md`` renders the rows.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "architectures.json"
SIZES = (32, 64, 96, 128, 160, 224, 299)
PARTNER = "resnet18"  # the fixed partner: the source of the model-as-target clone and
# the target of the model-as-source clone (random init, other seeds than the model)
NUM_CLASSES = 5
SEED = 0
PRUNED_RTOL = 1e-5  # pruned == masked: |pruned - masked| <= 1e-5 * max(1, max |masked|)
DEFAULT_MAX_PARAMS = 400_000_000  # ViT-L (306M) cloned within 24 GiB; ViT-H and RegNetY-128GF not
FIELDS = ("model", "input", "params", "traced", "boundaries", "mask_units", "prunable",
          "unmasked_reason",
          "wrapped_equals_module", "pruned_equals_masked", "pruned_max_diff",
          "pruned_boundaries", "refused_boundaries", "positions", "detach_exact",
          "verified", "package_bytes", "seconds", "error", "ok")


def one_line(err: BaseException | str, limit: int = 300) -> str:
    text = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
    first = " ".join(str(text).split())
    return first[:limit]


# ----------------------------------------------------------------------------- worker


class Stage:
    """The worker's row, written to ``path`` after every stage (a crash keeps what was done)."""

    def __init__(self, path: Path, row: dict[str, Any]) -> None:
        self.path, self.row = path, row

    def save(self, stage: str) -> None:
        self.row["stage"] = stage
        self.path.write_text(json.dumps(self.row))


def _calibrated(model, size: int, seed: int):
    """BatchNorm running statistics measured on 8 random images (one forward with
    only the BatchNorms in train mode): at random init some models' activations grow by orders of
    magnitude per block (Inception-v3's logits reach 1e10 with the statistics above), which
    overflows the adapter's least-squares fit. The statistics still differ per channel."""
    import torch
    from torch import nn

    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if not bns:
        return model
    gen = torch.Generator().manual_seed(seed)
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: exactly this batch's statistics
    model.eval()  # only the BatchNorms train: no auxiliary heads, no dropout
    for m in bns:
        m.train()
    with torch.no_grad():
        model(torch.rand(8, 3, size, size, generator=gen))
    for m in bns:
        m.momentum = 0.1
    return model.eval()


def _build(name: str, seed: int, size: int | None = None):
    import torch
    import torchvision

    from pnc_net.testing import frozen_randomized

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")  # googlenet/inception init FutureWarnings
        model = torchvision.models.get_model(name, num_classes=NUM_CLASSES)
    model = frozen_randomized(model, seed)
    return model if size is None else _calibrated(model, size, seed)


def _smallest_input(model) -> tuple[int, str | None]:
    import torch

    last = None
    for s in SIZES:
        try:
            with torch.no_grad():
                out = model(torch.rand(1, 3, s, s))
            if isinstance(out, torch.Tensor) and out.shape == (1, NUM_CLASSES):
                return s, None
            last = f"output {type(out).__name__} is not a (1, {NUM_CLASSES}) tensor"
        except Exception as err:  # noqa: BLE001 - any failure means "too small"
            last = one_line(err)
    return 0, last


def _pruned_checks(net, shape: tuple[int, ...]) -> dict[str, Any]:
    """pruned == masked at up to four boundaries (the test's check); concatenations refused."""
    import torch

    from pnc_net.errors import IncompatibleError
    from pnc_net.testing import masked_and_pruned, random_masks

    k = net.num_blocks
    bounds = sorted({max(1, k // 2), max(1, round(0.75 * k)), max(1, k - 1), k})
    masks = random_masks(net.mask_widths(), seed=1)
    x = torch.rand(2, *shape)
    accepted, refused, worst, equal = [], [], 0.0, True
    for s in bounds:
        try:
            check = masked_and_pruned(net, masks, x, s)
        except IncompatibleError as err:
            if "concatenation" not in str(err):
                raise
            refused.append(s)
            continue
        masked, pruned = check.masked, check.pruned
        diff = float((pruned - masked).abs().max())
        worst = max(worst, diff)
        equal = equal and diff <= PRUNED_RTOL * max(float(masked.abs().max()), 1.0)
        accepted.append(s)
    return {"pruned_boundaries": accepted, "refused_boundaries": refused,
            "pruned_max_diff": worst, "pruned_equals_masked": bool(accepted) and equal}


def _random_data(size: int, seed: int):
    """Ten classes of random images: a few per class per split (mechanics, not accuracy)."""
    import torch

    from pnc_net.data import Dataset

    gen = torch.Generator().manual_seed(seed)

    def split(per_class: int):
        y = torch.arange(10).repeat_interleave(per_class)
        return torch.rand(len(y), 3, size, size, generator=gen), y

    (xt, yt), (xv, yv), (xs, ys) = split(4), split(2), split(2)
    return Dataset("random", tuple(str(i) for i in range(10)), xt, yt, xv, yv, xs, ys)


def _clone_once(root: Path, files: dict[str, Path], target: str, source: str,
                labels: dict[str, tuple[str, ...]], size: int, position: tuple[int, int],
                data) -> dict[str, Any]:
    """One clone through the library's path; returns package bytes, verified, detach_exact."""
    import torch

    from pnc_net import wire
    from pnc_net.cloning import CloneConfig, clone
    from pnc_net.insert import InsertConfig
    from pnc_net.localize import LocalizeConfig
    from pnc_net.rebuild import verify
    from pnc_net.zoo import Zoo, state_digest

    shape = (3, size, size)
    zoo = Zoo(root)
    for ref in (target, source):
        try:
            zoo.add_checkpoint(files[ref], f"torchvision:{ref.split('@')[0]}", labels[ref],
                               shape, name=ref.replace("@", "-"))
        except Exception as err:  # noqa: BLE001 - the row names the step that failed
            raise RuntimeError(f"Zoo.add_checkpoint of {ref}: {one_line(err)}") from None
    t_name, s_name = target.replace("@", "-"), source.replace("@", "-")
    digests = {n: state_digest(zoo.load_module(n)[0]) for n in (t_name, s_name)}
    cfg = CloneConfig.single(
        t_name, s_name, labels[source][:2], per_class=4, target_per_class=2, seed=SEED,
        positions=(position,), synthesize=False,
        localize=LocalizeConfig(perturbations_per_sample=1, refine_steps=2),
        insert=InsertConfig(epochs=1, gate_steps=5, augment_copies=0, lsq_samples=64,
                            veto_quantiles=(None,)))
    result = clone(zoo, data, cfg)
    payload = wire.encode(result.package)
    package = wire.decode(payload)
    fresh = Zoo(root)  # a receiver: nothing cached from the sender's side
    try:
        sb, err = verify(fresh, package)
    except Exception as exc:  # noqa: BLE001
        raise RuntimeError(f"rebuild/verify: {one_line(exc)}") from None
    module, _ = fresh.load_module(t_name)
    x = torch.rand(2, *shape)
    with torch.no_grad():
        exact = torch.equal(sb.detach()(x), module(x))
    unchanged = all(state_digest(Zoo(root).load_module(n)[0]) == d for n, d in digests.items())
    return {"package_bytes": len(payload), "verified": bool(err <= package.fingerprint.tolerance),
            "detach_exact": bool(exact and unchanged)}


def worker(name: str, out: Path, max_params: int) -> None:
    import torch

    torch.set_num_threads(1)
    from pnc_net.graphnet import GraphNet, trace

    started = time.perf_counter()
    st = Stage(out, {"model": name, "error": None})
    row = st.row

    def fail(stage: str, err: BaseException | str) -> None:
        row["error"] = f"{stage}: {one_line(err)}"
        row["seconds"] = round(time.perf_counter() - started, 1)
        st.save("done")

    st.save("build")
    try:
        model = _build(name, SEED)
    except Exception as err:  # noqa: BLE001 - every failure becomes the row's reason
        return fail("build", err)
    row["params"] = sum(p.numel() for p in model.parameters())
    st.save("input")
    size, why = _smallest_input(model)
    row["input"] = size or None
    if not size:
        return fail("input", f"no input size in {SIZES} runs ({why})")
    shape = (3, size, size)
    _calibrated(model, size, SEED)
    st.save("trace")
    try:
        trace(model, shape)
        row["traced"] = True
    except Exception as err:  # noqa: BLE001
        row["traced"] = False
        return fail("trace", err)
    st.save("wrap")
    try:
        net = GraphNet(model, shape)
    except Exception as err:  # noqa: BLE001
        return fail("wrap (GraphNet)", err)
    row["boundaries"] = net.num_blocks
    row["mask_units"] = len(net.mask_widths())
    row["prunable"] = row["mask_units"] > 0
    row["unmasked_reason"] = net.unmasked_reason
    x = torch.rand(2, *shape)
    with torch.no_grad():
        row["wrapped_equals_module"] = bool(torch.equal(net(x), model(x)))
    st.save("pruned")
    try:
        row.update(_pruned_checks(net, shape))
    except Exception as err:  # noqa: BLE001
        row["pruned_equals_masked"] = False
        return fail("pruned == masked", err)
    if row["params"] > max_params:
        return fail("clone", f"skipped: {row['params']:,} params exceeds the sweep's memory "
                    f"budget ({max_params:,}) for clones")

    # the two clones: positions at about 3/4 of each network's depth
    k = net.num_blocks
    ok_s = row["pruned_boundaries"] or [k]
    s_own = min(ok_s, key=lambda s: (abs(s - 0.75 * k), -s))
    r_own = max(1, round(0.75 * k))
    del net
    partner_t, partner_s = f"{PARTNER}@t", f"{PARTNER}@s"
    data = _random_data(size, SEED)
    row["package_bytes"], row["verified"], row["detach_exact"], row["positions"] = {}, {}, {}, {}
    errors = []
    with tempfile.TemporaryDirectory(prefix="pnc-arch-") as tmp:
        root = Path(tmp)
        files = {name: root / f"{name}.pth", partner_t: root / "partner_t.pth",
                 partner_s: root / "partner_s.pth"}
        torch.save(model.state_dict(), files[name])
        del model
        partners = {partner_t: SEED + 1, partner_s: SEED + 2}
        partner_blocks = 0
        for ref, seed in partners.items():
            pm = _build(PARTNER, seed, size)
            torch.save(pm.state_dict(), files[ref])
            partner_blocks = GraphNet(pm, shape, maskable=False).num_blocks
        roles = {
            # role: (zoo dir, target, source, labels, position)
            "target": (root / "zoo-t", name, partner_s,
                       {name: tuple("01234"), partner_s: tuple("56789")},
                       (r_own, max(1, round(r_own / k * partner_blocks)))),
            "source": (root / "zoo-s", partner_t, name,
                       {partner_t: tuple("01234"), name: tuple("56789")},
                       (max(1, round(s_own / k * partner_blocks)), s_own)),
        }
        for role, (zroot, tgt, src, labels, pos) in roles.items():
            st.save(f"clone as {role}")
            row["positions"][role] = list(pos)
            try:
                got = _clone_once(zroot, files, tgt, src, labels, size, pos, data)
            except Exception as err:  # noqa: BLE001
                errors.append(f"as {role}: {one_line(err)}")
                row["detach_exact"][role] = False
                continue
            for key in ("package_bytes", "verified", "detach_exact"):
                row[key][role] = got[key]
    row["error"] = "; ".join(errors) or None
    row["seconds"] = round(time.perf_counter() - started, 1)
    st.save("done")


# ----------------------------------------------------------------------------- docs


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    return str(value)


def _roles(value: dict | None, fmt=_cell) -> str:
    value = value or {}
    return " / ".join(fmt(value.get(r)) for r in ("target", "source"))


def render(rows: list[dict], out: Path) -> None:
    """``docs/architectures.md`` from the sweep's rows (``--render``)."""
    failed = [r for r in rows if not r["ok"]]
    lines = [DOC_INTRO.strip(), "", f"**{summary(rows)}** "
             f"({100 * sum(r['ok'] for r in rows) / max(len(rows), 1):.0f}%; "
             f"{sum(r['seconds'] or 0 for r in rows) / 60:.0f} minutes of one core in all).", "",
             "## Failures", ""]
    if not failed:
        lines.append("None.")
    for r in failed:
        lines.append(f"- `{r['model']}`: {r['error'] or _failed_check(r)}")
    whole = [r for r in rows if r["ok"] and not r["mask_units"]]
    if whole:
        lines += ["", "## Cloned whole", "",
                  "These work, but with no mask units: a branch keeps every channel of the "
                  "source's tail (exact, only less localized).", ""]
        lines += [f"- `{r['model']}`: {r.get('unmasked_reason') or 'no coupled group can be masked'}"
                  for r in whole]
    lines += ["", "## Every model", "",
              "| model | input | params (M) | traced | boundaries | mask units "
              "| pruned == masked (max diff) | detach exact (T / S) | package bytes (T / S) "
              "| seconds | ok |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        diff = r["pruned_max_diff"]
        pm = _cell(r["pruned_equals_masked"]) + (f" ({diff:.0e})" if diff is not None else "")
        params = f"{r['params'] / 1e6:.1f}" if r["params"] else "-"
        lines.append(
            f"| {r['model']} | {_cell(r['input'])} | {params} | {_cell(r['traced'])} "
            f"| {_cell(r['boundaries'])} | {_cell(r['mask_units'])} | {pm} "
            f"| {_roles(r['detach_exact'])} "
            f"| {_roles(r['package_bytes'], lambda v: '-' if v is None else f'{v:,}')} "
            f"| {_cell(r['seconds'])} | {'yes' if r['ok'] else '**no**'} |")
    out.write_text("\n".join(lines) + "\n")


def _failed_check(row: dict) -> str:
    bad = [k for k in ("wrapped_equals_module", "pruned_equals_masked") if not row[k]]
    bad += [f"{k} ({role})" for k in ("detach_exact", "verified")
            for role, v in (row[k] or {}).items() if not v]
    return "failed " + ", ".join(bad)


DOC_INTRO = """
# Real architectures: the torchvision registry

Every classification architecture in torchvision
(`torchvision.models.list_models(module=torchvision.models)`) through
`pnc_net/graphnet.py`, at random init: does it wrap, and does it clone both ways?
Generated by `bench/bench_architectures.py` from `bench/results/architectures.json`;
how `GraphNet` finds boundaries and mask units is in `docs/method.md` (real
architectures).

Per model, in its own subprocess (one thread, a timeout, so a crash costs one row):

- **input**: the smallest square input among 32, 64, 96, 128, 160, 224, 299 that
  its forward accepts (seed 0, 5 classes, BatchNorm affine terms randomized as the
  tests do and BatchNorm statistics measured on 8 random images of that size);
- **traced**: `torch.fx` traces it; **boundaries** and **mask units** are the
  `GraphNet`'s; the wrapped net must equal the module (`torch.equal`);
- **pruned == masked**: random masks, Torch-Pruning's pruned tail against the gated
  net at up to four source boundaries (about 1/2, 3/4, the last two), within
  `atol = 1e-5 * max(1, max |masked|)` as in `tests/test_graphnet.py`
  (the table gives the largest difference);
- **two clones** through the library's own path: `.pth` files imported with
  `Zoo.add_checkpoint`, `cloning.clone` with one candidate position (about 3/4 of
  each network's depth), one epoch, 4 images per cloned class and 2 per target
  class of random data (mechanics, not accuracy): the model as **target** with a
  resnet18 source, and as **source** with a resnet18 target. Each package goes
  through `wire.encode`/`decode` (**package bytes**), is rebuilt and verified from
  a fresh `Zoo`, and `detach()` must give the exact target (`torch.equal`, zoo
  weights unchanged): **detach exact**.

A model counts when every check holds in both roles. Models above 400M parameters
(`--max-params`) get every check but the clones (memory: the sweep's machine has
24 GiB shared with other work); their row says "skipped".

Rerun (about an hour on one core):

```bash
OMP_NUM_THREADS=1 python bench/bench_architectures.py                 # or --models a,b --resume
python bench/bench_architectures.py --render docs/architectures.md    # this page
```
"""


# ----------------------------------------------------------------------------- sweep


def finish(row: dict[str, Any]) -> dict[str, Any]:
    """The row with every field (None where a stage did not run) and ``ok``."""
    out = {f: row.get(f) for f in FIELDS}
    de = out["detach_exact"] or {}
    out["ok"] = bool(out["error"] is None and out["pruned_equals_masked"]
                     and out["wrapped_equals_module"]
                     and de.get("target") is True and de.get("source") is True
                     and all((out["verified"] or {}).values()))
    return out


def run_one(name: str, timeout: float, max_params: int) -> dict[str, Any]:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pnc-arch-row-") as tmp:
        row_path, log_path = Path(tmp) / "row.json", Path(tmp) / "stderr.log"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name,
               "--row", str(row_path), "--max-params", str(max_params)]
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env=env,
                                    start_new_session=True)
            try:
                rc: int | None = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, 9)  # the worker's own process group only
                proc.wait()
                rc = None
        row: dict[str, Any] = {"model": name, "error": None}
        with contextlib.suppress(OSError, ValueError):
            row = json.loads(row_path.read_text())
        stage = row.pop("stage", "start")
        tail = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
        if rc is None:
            row["error"] = f"timeout: over {timeout:.0f} s during {stage}"
        elif rc != 0 or stage != "done":
            why = "killed (SIGKILL: likely out of memory)" if rc == -9 else f"exit {rc}"
            row["error"] = f"crash during {stage}: {why}; {one_line(tail[-1] if tail else '')}"
    row.setdefault("seconds", None)
    if rc is None or rc != 0:
        row["seconds"] = round(time.perf_counter() - started, 1)
    return finish(row)


def registry() -> list[str]:
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def write_rows(path: Path, rows: dict[str, dict], order: list[str]) -> None:
    names = [n for n in order if n in rows] + sorted(n for n in rows if n not in order)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps([rows[n] for n in names], indent=1) + "\n")
    tmp.replace(path)


def summary(rows: list[dict]) -> str:
    ok = sum(r["ok"] for r in rows)
    return (f"{ok} of {len(rows)} work as both target and source with detach_exact and "
            "pruned == masked")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", help="comma-separated names (default: the whole registry)")
    ap.add_argument("--limit", type=int, help="only the first N models")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--resume", action="store_true", help="skip models already in --out")
    ap.add_argument("--timeout-per-model", type=float, default=900.0, metavar="S")
    ap.add_argument("--max-params", type=int, default=DEFAULT_MAX_PARAMS,
                    help="above this many parameters, no clones (default %(default)s)")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON on stdout")
    ap.add_argument("--render", type=Path, metavar="MD",
                    help="write the markdown page of the rows in --out to MD, run nothing")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--row", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        warnings.filterwarnings("ignore")
        worker(args.worker, args.row, args.max_params)
        return 0

    order = registry()
    if args.render:
        rows_in = {r["model"]: r for r in json.loads(args.out.read_text())}
        render([rows_in[n] for n in order if n in rows_in]
               + [r for n, r in sorted(rows_in.items()) if n not in order], args.render)
        print(summary(list(rows_in.values())), file=sys.stderr)
        return 0
    names = [n.strip() for n in args.models.split(",") if n.strip()] if args.models else order
    unknown = [n for n in names if n not in order]
    if unknown:
        ap.error(f"not torchvision classification models: {', '.join(unknown)}")
    if args.limit is not None:
        names = names[: args.limit]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict] = {}
    if args.resume and args.out.exists():
        rows = {r["model"]: r for r in json.loads(args.out.read_text())}
    todo = [n for n in names if not (args.resume and n in rows)]
    t0 = time.perf_counter()
    for i, name in enumerate(todo, 1):
        print(f"[{i}/{len(todo)}] {name} ...", file=sys.stderr, flush=True)
        row = run_one(name, args.timeout_per_model, args.max_params)
        rows[name] = row
        write_rows(args.out, rows, order)
        status = "ok" if row["ok"] else f"FAIL {row['error']}"
        print(f"[{i}/{len(todo)}] {name}: {status} ({row['seconds']} s, input {row['input']}, "
              f"{row['boundaries']} boundaries, {row['mask_units']} units; "
              f"{time.perf_counter() - t0:.0f} s in all)", file=sys.stderr, flush=True)
    done = [rows[n] for n in names if n in rows]
    if args.json:
        print(json.dumps(done, indent=1))
    print(summary(done), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
