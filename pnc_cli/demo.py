"""``pnc demo``: the main job on the embedded default, start to finish."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from pnc_cli.common import METRIC_KEYS, RAY_LOCAL, JsonOpt, ZooOpt, console, print_json

#: The demo's task: digits 5,6 of the 5-9 model into the 0-4 model, the defaults' budgets.
DEMO_TARGET, DEMO_SOURCE, DEMO_CLASSES = "mnist-cnn-0to4", "mnist-cnn-5to9", ("5", "6")


def demo_cmd(
    zoo_dir: ZooOpt = None, json_out: JsonOpt = False,
    out: Annotated[Path | None, typer.Option("--out", help="Where to keep the package.")] = None,
    use_ray: Annotated[bool, typer.Option("--ray/--no-ray", help="Run the clone job on a local Ray cluster.")] = True,
    transfer: Annotated[bool, typer.Option("--transfer/--no-transfer", help="Send the package to a receiver daemon on 127.0.0.1.")] = True,
) -> None:
    """The main job: build the zoo if missing, clone digits 5,6 of a 5-9 model into a 0-4
    model on a local Ray cluster, verify the package, show that detaching restores the
    target exactly, and send the package to a receiver on loopback that answers predictions."""
    from pnc_cli.clone_run import ray_runner, run_clone
    from pnc_net import wire
    from pnc_net.cloning import CloneConfig
    from pnc_net.data import load_dataset
    from pnc_net.zoo import Zoo
    from pnc_net.zoo_train import build_default_zoo

    zoo = Zoo(zoo_dir)
    data = load_dataset(None)
    say = (lambda *_: None) if json_out else console.print
    say("[bold]1. zoo[/]: the default models (trained once, about a minute on 2 cores)")
    build_default_zoo(zoo, data, progress=not json_out)
    say(f"[bold]2. clone[/] digits {','.join(DEMO_CLASSES)} of {DEMO_SOURCE} into {DEMO_TARGET}"
        + (" on a local Ray cluster" if use_ray else ""))
    cfg = CloneConfig.single(DEMO_TARGET, DEMO_SOURCE, DEMO_CLASSES)
    with ray_runner(RAY_LOCAL if use_ray else None) as runner:
        result, _, _ = run_clone(cfg, data=None, zoo_dir=zoo_dir, quiet=json_out, runner=runner)
    out = out or Path(tempfile.mkdtemp(prefix="pnc-demo-")) / "demo.pnc"
    pid, nbytes = wire.write_package(out, result.package)
    say(f"[bold]3. package[/] {out} ({nbytes:,} bytes): rebuild from the zoo, verify, detach")
    m = result.report["metrics"]
    info = {"package": str(out), "package_id": pid, "package_bytes": nbytes,
            "superbody_bytes": m["superbody_bytes"], **check_package(zoo, out, data),
            "ray": use_ray, **{k: m[k] for k in METRIC_KEYS}}
    if transfer:
        from pnc_cli.net import demo_transfer

        say("[bold]4. transfer[/]: a receiver daemon on 127.0.0.1 rebuilds it from its own zoo")
        info["transfer"] = demo_transfer(out, zoo_dir)
    if json_out:
        print_json(info)
        return
    console.print(results_table(info, m))
    if transfer:
        console.print(transfer_table(info["transfer"]))


def check_package(zoo, path: Path, data) -> dict:
    """Read the written package back as a receiver would: rebuild and verify the
    superbody from the zoo, and check that detaching gives the target bit for bit."""
    from pnc_net import wire
    from pnc_net.metrics import detach_is_exact
    from pnc_net.rebuild import verify
    from pnc_net.zoo import model_from_weights

    package, _ = wire.read_package(path)
    superbody, fp_err = verify(zoo, package)
    manifest = zoo.resolve(package.target.sha256)
    exact = detach_is_exact(superbody, model_from_weights(manifest, zoo.read_weights(manifest)),
                            data.x_test)
    return {"detach_exact": exact, "fingerprint_error": fp_err}


def results_table(info: dict, m: dict) -> Table:
    table = Table(title="pnc demo: mnist-cnn-0to4 + {5, 6} from mnist-cnn-5to9 (test split)")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("old-class accuracy (target alone)", f"{m['acc_old']:.3f} ({m['target_acc_old']:.3f})")
    table.add_row("new-class accuracy (source alone)", f"{m['acc_new']:.3f} ({m['source_acc_new']:.3f})")
    table.add_row("all-class accuracy", f"{m['acc_all']:.3f}")
    table.add_row("locality (agrees with target)", f"{m['locality']:.3f}")
    table.add_row("package bytes", f"{info['package_bytes']:,}")
    table.add_row("superbody bytes (fp32)", f"{m['superbody_bytes']:,}")
    table.add_row("package / superbody", f"{info['package_bytes'] / m['superbody_bytes']:.2%}")
    table.add_row("detach() restores the target bit for bit", "yes" if info["detach_exact"] else "NO")
    return table


def transfer_table(t: dict) -> Table:
    table = Table(title="receiver on 127.0.0.1: rebuilt from its zoo + the package")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("bytes on the wire (both directions)", f"{t['wire_bytes']:,}")
    if t.get("superbody_bytes"):
        table.add_row("full cloned model (fp32)", f"{t['superbody_bytes']:,}")
    table.add_row("send -> rebuilt and verified", f"{t['send_to_verified_s']:.3f} s ({t['state']})")
    preds = ", ".join(f"{p['true']}->{p['predicted']}" for p in t["predictions"])
    table.add_row("remote predictions (true->predicted)", preds)
    return table


def register(app: typer.Typer) -> None:
    """Add ``pnc demo`` to ``app``."""
    app.command("demo")(demo_cmd)
