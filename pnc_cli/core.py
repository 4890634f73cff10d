"""Core commands: the zoo, clone, eval and inspect.

Registered for every ``pnc`` call, so the module itself stays light: torch and the
clone pipeline are imported inside the commands that need them (``pnc --help`` and
the edge client must not pay seconds of torch import).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from pnc_cli.common import (
    GAP_KEYS,
    METRIC_KEYS,
    RAY_LOCAL,
    DeviceOpt,
    JsonOpt,
    PrecisionOpt,
    ZooOpt,
    console,
    optional_value_command,
    print_json,
    split_labels,
)
from pnc_net.errors import ExitCode, IncompatibleError, InvalidInputError

DataOpt = Annotated[Path | None, typer.Option(
    "--data", help="An .npz, an ImageFolder or a CIFAR batches folder (default: embedded MNIST).")]

zoo_app = typer.Typer(help="Build, import, list, export and verify the local model zoo.",
                      no_args_is_help=True)


# ----------------------------------------------------------------------------- zoo


@zoo_app.command("build")
def zoo_build(
    seed: Annotated[int, typer.Option(
        help="Training seed. Another seed gives another zoo with the same model names "
             "(build it into another --zoo) to check that a result holds across zoos.")] = 0,
    zoo_set: Annotated[str, typer.Option(
        "--set", help="default: pnc's CNN and ResNet on the MNIST digits (about a minute on "
                      "2 cores). rgb: torchvision resnet18 (0-4), mobilenet_v3_small "
                      "(5-9) and a small VisionTransformer (5-9) on the colour digits "
                      "(--data rgb-digits), imported as ordinary checkpoints.")] = "default",
    zoo_dir: ZooOpt = None, json_out: JsonOpt = False,
) -> None:
    """Train a zoo: the default MNIST one (CNN and ResNet, digits 0-4 and 5-9) or
    --set rgb. Idempotent: models already there are kept."""
    import torch

    from pnc_net.data import load_dataset
    from pnc_net.zoo import Zoo
    from pnc_net.zoo_train import ZOO_SETS, build_default_zoo

    if zoo_set not in ZOO_SETS:
        raise InvalidInputError(f"--set {zoo_set!r} is not a zoo set; choose "
                                f"{' or '.join(ZOO_SETS)}")
    data_name, specs = ZOO_SETS[zoo_set]
    torch.set_num_threads(max(1, torch.get_num_threads()))
    zoo = Zoo(zoo_dir)
    built = build_default_zoo(zoo, load_dataset(data_name), progress=not json_out, seed=seed,
                              specs=specs)
    if json_out:
        print_json([{"name": m.name, "sha256": m.sha256, "built": new} for m, new in built])
        return
    for m, new in built:
        acc = "" if m.test_accuracy is None else f"test acc {m.test_accuracy:.3f}"
        console.print(f"{'built ' if new else 'present'} {m.name:20s} {m.sha256[:12]} {acc}")


@zoo_app.command("train")
def zoo_train(
    data: Annotated[Path, typer.Option("--data", help="Training data: an .npz, an ImageFolder or a CIFAR batches folder.")],
    classes: Annotated[str, typer.Option("--classes", help="Label names to learn, e.g. 0,1,2.")],
    arch: Annotated[str, typer.Option("--arch", help="Architecture: cnn or resnet.")] = "cnn",
    name: Annotated[str, typer.Option("--name", help="Model name (a label).")] = "",
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 6,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per training step.")] = 64,
    seed: int = 0, zoo_dir: ZooOpt = None, device: DeviceOpt = "cpu",
    precision: PrecisionOpt = "fp32", json_out: JsonOpt = False,
) -> None:
    """Train a model on your own data and add it to the zoo.

    The weights are stored from the CPU whatever --device trained them; a GPU-trained
    model is a different model (another digest) from the CPU-trained one."""
    from pnc_net.data import load_dataset
    from pnc_net.devices import Compute
    from pnc_net.zoo import Zoo
    from pnc_net.zoo_train import ZooSpec, train_zoo_model

    compute = Compute.of(device, precision)  # before the data is read
    dataset = load_dataset(data)
    labels = split_labels(classes)
    if batch_size < 1:
        raise InvalidInputError(f"--batch-size must be at least 1, got {batch_size}")
    spec = ZooSpec(name or f"{dataset.name}-{arch}-{'-'.join(labels)}", arch, labels, epochs,
                   seed=seed, batch_size=batch_size)
    m = train_zoo_model(Zoo(zoo_dir), dataset, spec, progress=not json_out, compute=compute)
    if json_out:
        print_json({"name": m.name, "sha256": m.sha256, "test_accuracy": m.test_accuracy})
    else:
        console.print(f"added {m.name} {m.sha256[:12]} test acc {m.test_accuracy:.3f}")


@zoo_app.command("list")
def zoo_list(zoo_dir: ZooOpt = None, json_out: JsonOpt = False) -> None:
    """List the zoo's models (with --json: their manifests)."""
    from pnc_net.zoo import Zoo

    zoo = Zoo(zoo_dir)
    manifests = zoo.manifests()
    if json_out:
        print_json([dataclasses.asdict(m) for m in manifests])
        return
    table = Table(title=f"zoo at {zoo.root}")
    for col in ("name", "sha256", "arch", "labels", "params", "test acc"):
        table.add_column(col)
    for m in manifests:
        table.add_row(m.name, m.sha256[:12], m.arch, ",".join(m.label_names),
                      f"{m.num_params:,}",
                      "-" if m.test_accuracy is None else f"{m.test_accuracy:.3f}")
    console.print(table if manifests else f"the zoo at {zoo.root} is empty; run `pnc zoo build`")


def parse_floats(text: str | None, flag: str) -> tuple[float, ...] | None:
    """``--mean 0.5,0.5,0.5`` as floats (None when the flag is not given)."""
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise InvalidInputError(f"{flag} {text!r}: give comma-separated numbers, "
                                "one per channel, e.g. 0.5,0.5,0.5") from None


def parse_input_shape(text: str) -> tuple[int, ...]:
    """``--input 3x32x32`` as ``(3, 32, 32)``."""
    try:
        return tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        raise InvalidInputError(f"--input {text!r}: give channels x height x width, "
                                "e.g. 3x32x32") from None


def parse_arch_args(text: str | None) -> dict:
    """``--arch-args '{"image_size": 32}'`` as a dict."""
    if text is None:
        return {}
    try:
        args = json.loads(text)
    except ValueError as err:
        raise InvalidInputError(f"--arch-args is not JSON: {err}") from None
    if not isinstance(args, dict):
        raise InvalidInputError("--arch-args must be a JSON object, e.g. '{\"image_size\": 32}'")
    return args


@zoo_app.command("add")
def zoo_add(
    arch: Annotated[str, typer.Option(
        "--arch", help="cnn, resnet, torchvision:NAME (e.g. torchvision:resnet18) or timm:NAME.")],
    weights: Annotated[Path, typer.Option(
        "--weights", help="The checkpoint: a state_dict as .pth (loaded weights-only) or "
                          ".safetensors.")],
    labels: Annotated[str, typer.Option(
        "--labels", help="One label per output of the head, in order, e.g. cat,dog,bird.")],
    input_shape: Annotated[str, typer.Option(
        "--input", help="Input size CxHxW, e.g. 3x32x32.", metavar="CxHxW")],
    mean: Annotated[str | None, typer.Option(
        "--mean", help="Per-channel mean of the preprocessing, e.g. 0.485,0.456,0.406.")] = None,
    std: Annotated[str | None, typer.Option(
        "--std", help="Per-channel std of the preprocessing, e.g. 0.229,0.224,0.225.")] = None,
    name: Annotated[str | None, typer.Option(
        "--name", help="Model name (a label; default: the file's stem).")] = None,
    arch_args: Annotated[str | None, typer.Option(
        "--arch-args", help="More constructor arguments as JSON, e.g. '{\"image_size\": 32}'.",
        metavar="JSON")] = None,
    expect_sha256: Annotated[str | None, typer.Option(
        "--sha256", help="Refuse the file unless its sha256 starts with this hex (the "
                         "publisher's digest; torch.hub puts 8+ digits in file names).",
        metavar="HEX")] = None,
    zoo_dir: ZooOpt = None, json_out: JsonOpt = False,
) -> None:
    """Import an ordinary checkpoint (any torchvision or timm classifier) into the zoo."""
    from pnc_net.zoo import Zoo

    label_names = tuple(c.strip() for c in labels.split(","))
    manifest, new = Zoo(zoo_dir).add_checkpoint(
        weights, arch, label_names, parse_input_shape(input_shape),
        mean=parse_floats(mean, "--mean"), std=parse_floats(std, "--std"), name=name,
        arch_args=parse_arch_args(arch_args), expect_sha256=expect_sha256)
    if json_out:
        print_json({"id": manifest.sha256, "added": new, **dataclasses.asdict(manifest)})
        return
    console.print(f"{'added' if new else 'present'} {manifest.name} {manifest.sha256[:12]} "
                  f"({manifest.arch}, {manifest.num_params:,} params, tensors "
                  f"{manifest.tensors_sha256[:12]})", highlight=False, soft_wrap=True)


@zoo_app.command("export")
def zoo_export(
    model: Annotated[str, typer.Argument(help="Zoo model: name, sha256 or a unique prefix.")],
    out: Annotated[Path, typer.Option("--out", help="The .safetensors file to write.")],
    zoo_dir: ZooOpt = None, json_out: JsonOpt = False,
) -> None:
    """Write a zoo model's weights as a plain state_dict (.safetensors)."""
    from pnc_net.zoo import Zoo

    manifest, path = Zoo(zoo_dir).export(model, out)
    if json_out:
        print_json({"name": manifest.name, "id": manifest.sha256, "sha256": manifest.sha256,
                    "tensors_sha256": manifest.tensors_sha256, "arch": manifest.arch,
                    "out": str(path), "size_bytes": manifest.size_bytes})
        return
    console.print(f"wrote {path} ({manifest.size_bytes:,} bytes): {manifest.name} "
                  f"{manifest.sha256[:12]}, {manifest.arch}", highlight=False, soft_wrap=True)


@zoo_app.command("verify")
def zoo_verify(zoo_dir: ZooOpt = None, json_out: JsonOpt = False) -> None:
    """Check every model's weights against its manifest's sha256."""
    from pnc_net.zoo import Zoo

    report = Zoo(zoo_dir).verify()
    if json_out:
        print_json([{"name": m.name, "sha256": m.sha256, "ok": p is None, "problem": p}
                    for m, p in report])
    else:
        for m, problem in report:
            console.print(f"{'ok  ' if problem is None else 'FAIL'} {m.name} {m.sha256[:12]}"
                          + (f": {problem}" if problem else ""), soft_wrap=True, highlight=False)
    if any(p for _, p in report):
        raise typer.Exit(ExitCode.INTEGRITY)


# ----------------------------------------------------------------------------- clone


def metrics_table(title: str, metrics: dict, extra: dict | None = None) -> Table:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in {**metrics, **(extra or {})}.items():
        table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    return table


def summary(result, package_bytes: int, out: Path | None, seconds: float) -> dict:
    m = result.report["metrics"]
    positions = [[b.position_r, b.position_s] for b in result.superbody.branches]
    return {"package": str(out) if out else None, "package_bytes": package_bytes,
            "superbody_bytes": m["superbody_bytes"],
            "position": positions[0] if len(positions) == 1 else positions,
            **{k: m.get(k) for k in METRIC_KEYS}, "gap": {k: m.get(k) for k in GAP_KEYS},
            "seconds": seconds}


def clone_cmd(
    target: Annotated[str, typer.Option("--target", help="Target zoo model (name or sha256).")],
    source: Annotated[list[str], typer.Option("--source", help="Source zoo model; repeat for several.")],
    classes: Annotated[list[str], typer.Option("--classes", help="Classes to clone, e.g. 5,6; one per --source.")],
    per_class: Annotated[int, typer.Option("--per-class", help="Cloned-class samples per class (k).")] = 100,
    target_per_class: Annotated[int, typer.Option("--target-per-class", help="Target-class samples per class (k_t); 0 = the article's setting.")] = 20,
    data: DataOpt = None, zoo_dir: ZooOpt = None,
    out: Annotated[Path | None, typer.Option("--out", help="Package file to write.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for sampling and training.")] = 0,
    positions: Annotated[str | None, typer.Option("--positions", help="Candidate R:S pairs, e.g. 3:3,4:4 (default: depth-matched pairs).")] = None,
    adapter_rank: Annotated[int, typer.Option(
        "--adapter-rank",
        help="Rank of the adapter's 1x1 map (its weights travel as int8 in an fp16 package).")] = 16,
    joint_rounds: Annotated[int, typer.Option(
        "--joint-rounds",
        help="Rounds of joint refinement of the chosen branch (0-10): the source's tail masks "
             "refined through the inserted path, then adapter and gate retrained; a round is "
             "kept only if the validation score does not fall (docs/method.md, step 4).")] = 0,
    gate: Annotated[str, typer.Option("--gate", help="The router: auto (the measured best: now a linear discriminant over both networks' features, with the target's energy veto on top; without --target-per-class it is fitted against inverted stand-ins of the target's digits), mlp (the small MLP gate with the veto) or lda (docs/method.md, the router).")] = "auto",
    gate_taps: Annotated[str, typer.Option(
        "--gate-taps",
        help="Target layers the discriminant gate (--gate auto or lda; the MLP gate ignores "
             "this) may read, pooled, besides its last ones: none, early (the first half of "
             "the target's boundaries), all, or auto: all with --target-per-class > 0 (early "
             "layers still tell a cloned input from the target's own where its last ones do "
             "not), none without (the inverted stand-ins' early layers do not look like real "
             "digits'). docs/method.md, the router.")] = "auto",
    gate_features: Annotated[str, typer.Option(
        "--gate-features",
        help="How many of those features the discriminant gate keeps, the ones it weighs "
             "most: half (half the width of its features without taps: fewer bytes than no "
             "taps, and better routing, measured), all, or a count.")] = "half",
    gate_stand_ins: Annotated[bool | None, typer.Option(
        "--gate-stand-ins/--no-gate-stand-ins",
        help="With --target-per-class > 0, whether the target's inverted stand-ins join its "
             "real digits in the discriminant's fit; by default both fits are made and "
             "validation keeps the better. Without them more cloned digits went to the "
             "branch on the rgb pairs (acc_new +0.05 at the same acc_old) and on MNIST "
             "(+0.017, for 0.003 of acc_old): docs/method.md, the router.",
        show_default="chosen on validation")] = None,
    gate_log_odds: Annotated[float, typer.Option(
        "--gate-log-odds",
        help="The discriminant gate's prior log-odds of the cloned classes against the "
             "target's: 0 puts half the prior mass on each side; below 0 the gate needs "
             "more evidence to open (more locality, fewer cloned inputs routed). "
             "docs/method.md, the router.")] = 0.0,
    gate_views: Annotated[int, typer.Option(
        "--gate-views",
        help="The router's second look: where its log-odds are within 4 of 0, it also reads "
             "this many fixed views of the input (1-px shifts and the transforms --augment "
             "kept) and averages, 0-8 (0: none). 8 raised acc_new 0.941 -> 0.951 on MNIST and "
             "locality 0.955 -> 0.971 on the rgb ViT pair, for 2-3.5x the serving time. "
             "docs/method.md, the router.")] = 0,
    augment: Annotated[str, typer.Option(
        "--augment",
        help="Transforms of the cloning samples' shifted copies: affine (rotation up to "
             "11.5 degrees, zoom up to 10%), permute (channel order), invert (1 - x); auto "
             "keeps each one under which the source keeps 80% of its accuracy on the cloned "
             "samples and the target 80% of its answers on its real digits (MNIST: affine; "
             "the rgb digits: all three), off keeps shifts only, or name them, "
             "comma-separated. The report's augment says what was kept and why. "
             "docs/method.md, augmentation.")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="Wire dtype of adapter/gate: fp16 (the adapter's and a discriminant gate's weights as int8), fp32, int8 (every matrix int8, vectors fp16).")] = "fp16",
    ray: Annotated[str | None, typer.Option("--ray", help="Run the search on Ray: `--ray` alone starts a local cluster (or joins $RAY_ADDRESS); `--ray ADDRESS` joins that cluster.", metavar="[ADDRESS]")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Most images any pass holds at once (default: each step's own, 64 to 512); lower it when memory is short.")] = None,
    search: Annotated[str, typer.Option("--search", help="Position search: exhaustive (every candidate at the full budget) or halving (successive halving: short trainings prune to the top third, the finalists get the full budget; docs/method.md, Position search).")] = "exhaustive",
    device: DeviceOpt = "cpu",
    precision: PrecisionOpt = "fp32",
    json_out: JsonOpt = False,
) -> None:
    """Clone classes of a source zoo model into a target; write the package.

    With --ray, --device is where this process plans and measures; each Ray worker
    computes on the GPU Ray gives it (num_gpus), else on its CPU."""
    from pnc_cli.clone_run import clone_config, ray_runner, run_clone
    from pnc_net import wire

    started = time.perf_counter()
    if dtype not in wire.WIRE_DTYPES:
        raise InvalidInputError(f"--dtype {dtype!r} is not one of {', '.join(wire.WIRE_DTYPES)}")
    cfg = clone_config(target, source, classes, per_class=per_class,
                       target_per_class=target_per_class, seed=seed, positions=positions,
                       adapter_rank=adapter_rank, batch_size=batch_size, search=search, device=device,
                       precision=precision, gate=gate, joint_rounds=joint_rounds,
                       gate_taps=gate_taps, gate_features=gate_features,
                       gate_stand_ins=gate_stand_ins, gate_log_odds=gate_log_odds,
                       augment=augment, gate_views=gate_views)  # before Ray starts
    with ray_runner(ray) as runner:
        result, _, _ = run_clone(cfg, data=data, zoo_dir=zoo_dir, quiet=json_out, runner=runner)
    out = out or Path(f"{result.package.target.name}+{'-'.join(result.superbody.label_names[len(result.superbody.target_labels):])}.pnc")
    pid, nbytes = wire.write_package(out, result.package, dtype)
    info = {**summary(result, nbytes, out, time.perf_counter() - started), "package_id": pid}
    if json_out:
        print_json(info)
        return
    console.print(metrics_table(f"cloned into {result.package.target.name}", {
        k: info[k] for k in METRIC_KEYS}, {**info["gap"], "position R:S": info["position"],
        "package_bytes": nbytes, "superbody_bytes": info["superbody_bytes"],
        "seconds": round(info["seconds"], 1)}))
    console.print(f"wrote {out} ({nbytes:,} bytes, id {pid[:16]})")


# ----------------------------------------------------------------------------- eval / inspect


def check_eval_data(dataset, input_shape: tuple[int, ...], labels: tuple[str, ...]) -> None:
    """Refuse test data the superbody cannot run on or has no label in common with."""
    if tuple(dataset.input_shape) != input_shape:
        raise IncompatibleError(
            f"dataset {dataset.name!r} has inputs {tuple(dataset.input_shape)} but the package's "
            f"target takes {input_shape}")
    missing = [n for n in labels if n not in dataset.label_names]
    if missing:
        raise IncompatibleError(
            f"dataset {dataset.name!r} lacks the package's label(s) {missing} (its labels: "
            f"{', '.join(dataset.label_names)}); every metric needs test samples of each")


def eval_cmd(package: Annotated[Path, typer.Argument(help="A .pnc package file.")],
             data: DataOpt = None, zoo_dir: ZooOpt = None,
             batch_size: Annotated[int, typer.Option("--batch-size", help="Test images per forward pass.")] = 512,
             device: DeviceOpt = "cpu", precision: PrecisionOpt = "fp32",
             json_out: JsonOpt = False) -> None:
    """Rebuild the superbody from the zoo and the package; report metrics and detach_exact.

    The fingerprint and detach_exact are checked on the CPU whatever --device says
    (they compare against CPU outputs); the test-set metrics run on --device."""
    from pnc_net import wire
    from pnc_net.data import load_dataset
    from pnc_net.devices import Compute, on_device
    from pnc_net.metrics import clone_metrics, detach_is_exact
    from pnc_net.rebuild import load_ref, verify
    from pnc_net.zoo import Zoo, model_from_weights

    started = time.perf_counter()
    if batch_size < 1:
        raise InvalidInputError(f"--batch-size must be at least 1, got {batch_size}")
    compute = Compute.of(device, precision)
    zoo = Zoo(zoo_dir)
    pkg, raw = wire.read_package(package)
    superbody, fp_err = verify(zoo, pkg)
    dataset = load_dataset(data)
    check_eval_data(dataset, tuple(load_ref(zoo, pkg.target)[2]), pkg.label_names)
    sources = [(on_device(model, compute), labels)
               for model, labels in (load_ref(zoo, m.source)[:2] for m in pkg.modules)]
    metrics = clone_metrics(on_device(superbody, compute), dataset, sources, batch_size, compute)
    fresh_manifest = zoo.resolve(pkg.target.sha256)
    fresh = model_from_weights(fresh_manifest, zoo.read_weights(fresh_manifest))
    exact = detach_is_exact(superbody, fresh, dataset.x_test)
    positions = [[m.position_r, m.position_s] for m in pkg.modules]
    info = {"package": str(package), "package_bytes": len(raw),
            "superbody_bytes": metrics["superbody_bytes"],
            "position": positions[0] if len(positions) == 1 else positions,
            **{k: metrics.get(k) for k in METRIC_KEYS},
            "gap": {k: metrics.get(k) for k in GAP_KEYS}, "detach_exact": exact,
            "fingerprint_error": fp_err, "seconds": time.perf_counter() - started}
    if json_out:
        print_json(info)
    else:
        console.print(metrics_table(f"{package.name}", {k: info[k] for k in METRIC_KEYS},
                                    {**info["gap"], "detach_exact": exact, "fingerprint_error": f"{fp_err:.2e}",
                                     "package_bytes": len(raw)}))


def inspect_cmd(package: Annotated[Path, typer.Argument(help="A .pnc package file.")],
                json_out: JsonOpt = False) -> None:
    """Show a package: zoo references, position, kept filters, tensors and sizes."""
    from pnc_net import wire

    pkg, raw = wire.read_package(package)
    info = {
        "package_id": wire.package_id(raw), "package_bytes": len(raw),
        "format_version": pkg.format_version, "writer_version": pkg.writer_version,
        "target": vars(pkg.target), "label_names": list(pkg.label_names),
        "modules": [{
            "source": vars(m.source), "cloned_classes": list(m.cloned_classes),
            "position": [m.position_r, m.position_s],
            "kept_filters": {k: list(v) for k, v in m.kept_filters().items()},
            "tensors": {k: list(v.shape) for k, v in m.tensors.items()}, "config": m.config,
        } for m in pkg.modules],
        "metrics": pkg.report.get("metrics", {}),
    }
    if json_out:
        print_json(info)
        return
    console.print(f"package {info['package_id'][:16]}  {len(raw):,} bytes  format v{pkg.format_version}")
    console.print(f"target  {pkg.target.name}  {pkg.target.sha256[:16]}")
    console.print(f"labels  {', '.join(pkg.label_names)}")
    for m in info["modules"]:
        console.print(f"source  {m['source']['name']}  {m['source']['sha256'][:16]}  "
                      f"classes {m['cloned_classes']}  R:S = {m['position'][0]}:{m['position'][1]}")
        table = Table("layer", "kept / width")
        for k, (kept, width) in m["kept_filters"].items():
            table.add_row(k, f"{kept} / {width}")
        console.print(table)
        table = Table("tensor", "shape")
        for k, shape in m["tensors"].items():
            table.add_row(k, "x".join(map(str, shape)))
        console.print(table)


def register(app: typer.Typer) -> None:
    """Add the zoo, clone, eval and inspect commands to ``app``."""
    app.add_typer(zoo_app, name="zoo")
    # A bare `--ray` (last, or before another option) means a local cluster.
    app.command("clone", cls=optional_value_command({"--ray": RAY_LOCAL}))(clone_cmd)
    app.command("eval")(eval_cmd)
    app.command("inspect")(inspect_cmd)
