"""``pnc demo``: the main job on the embedded default, start to finish."""

from __future__ import annotations

import tempfile
from pathlib import Path

import typer
from rich.table import Table

from pnc_cli.common import JsonOpt, ZooOpt, console, print_json
from pnc_net import wire
from pnc_net.data import load_dataset
from pnc_net.metrics import detach_is_exact
from pnc_net.rebuild import verify
from pnc_net.zoo import Zoo, model_from_weights
from pnc_net.zoo_train import build_default_zoo


def demo_cmd(zoo_dir: ZooOpt = None, json_out: JsonOpt = False,
             out: Path | None = typer.Option(None, "--out", help="Where to keep the package.")) -> None:
    """Build the zoo if missing, clone digits 5,6 from a 5-9 model into a 0-4 model,
    verify the package, and show that detaching restores the target exactly."""
    from pnc_cli.core import run_clone

    zoo = Zoo(zoo_dir)
    data = load_dataset(None)
    say = (lambda *_: None) if json_out else console.print
    say("[bold]1. zoo[/] (trains the default models once; ~1 min on 2 cores)")
    build_default_zoo(zoo, data, progress=not json_out)
    say("[bold]2. clone[/] digits 5,6 of mnist-cnn-5to9 into mnist-cnn-0to4")
    result, _, _ = run_clone("mnist-cnn-0to4", ["mnist-cnn-5to9"], ["5,6"], 100, 20, None,
                             zoo_dir, 0, None, 8, json_out)
    out = out or Path(tempfile.mkdtemp(prefix="pnc-demo-")) / "demo.pnc"
    pid, nbytes = wire.write_package(out, result.package)
    say(f"[bold]3. package[/] {out} ({nbytes:,} bytes); rebuilding from the zoo and verifying")
    package, _ = wire.read_package(out)
    superbody, fp_err = verify(zoo, package)
    manifest = zoo.resolve(package.target.sha256)
    exact = detach_is_exact(superbody, model_from_weights(manifest, zoo.read_weights(manifest)),
                            data.x_test)
    m = result.report["metrics"]
    info = {"package": str(out), "package_id": pid, "package_bytes": nbytes,
            "superbody_bytes": m["superbody_bytes"], "detach_exact": exact,
            "fingerprint_error": fp_err, **{k: m[k] for k in (
                "acc_old", "acc_new", "acc_all", "locality", "target_acc_old", "source_acc_new")}}
    if json_out:
        print_json(info)
        return
    table = Table(title="pnc demo: mnist-cnn-0to4 + {5, 6} from mnist-cnn-5to9 (test split)")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("old-class accuracy (target alone)", f"{m['acc_old']:.3f} ({m['target_acc_old']:.3f})")
    table.add_row("new-class accuracy (source alone)", f"{m['acc_new']:.3f} ({m['source_acc_new']:.3f})")
    table.add_row("all-class accuracy", f"{m['acc_all']:.3f}")
    table.add_row("locality (agrees with target)", f"{m['locality']:.3f}")
    table.add_row("package bytes", f"{nbytes:,}")
    table.add_row("superbody bytes (fp32)", f"{m['superbody_bytes']:,}")
    table.add_row("package / superbody", f"{nbytes / m['superbody_bytes']:.2%}")
    table.add_row("detach() restores the target bit for bit", "yes" if exact else "NO")
    console.print(table)
