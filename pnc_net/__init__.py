"""pnc: partial network cloning.

A *target* zoo network gains some classes of a *source* zoo network without a
single pretrained weight changing. What travels between machines is a small
package ``<masks, R, adapter, fusion gate>``; every node already holds the zoo.

Typical use::

    from pnc_net import CloneConfig, Zoo, build_superbody, clone, load_mnist

    zoo, data = Zoo(), load_mnist()
    result = clone(zoo, data, CloneConfig.single("mnist-cnn-0to4", "mnist-cnn-5to9",
                                                 ("5", "6")))
    superbody = build_superbody(zoo, result.package)

Two modules held in memory (torchvision models, say), no zoo::

    from pnc_net import clone_modules

    result = clone_modules(r18, mobilenet, data, classes=("5", "6"), name="five_six")
    result.superbody.set_branches([])      # the bare target; ["five_six"] again to clone

The names below are imported on first use (PEP 562), so ``import pnc_net`` and
the torch-free edge client (``pnc_net.serve.client``) do not pay for torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the module that defines it
_API = {
    "Zoo": "pnc_net.zoo",
    "Manifest": "pnc_net.zoo",
    "Dataset": "pnc_net.data",
    "load_mnist": "pnc_net.data",
    "load_dataset": "pnc_net.data",
    "CloneConfig": "pnc_net.cloning",
    "SourceSpec": "pnc_net.cloning",
    "CloneResult": "pnc_net.cloning",
    "clone": "pnc_net.cloning",
    "clone_modules": "pnc_net.modules_api",
    "Superbody": "pnc_net.superbody",
    "Branch": "pnc_net.superbody",
    "Package": "pnc_net.package",
    "build_superbody": "pnc_net.rebuild",
    "verify": "pnc_net.rebuild",
    "clone_metrics": "pnc_net.metrics",
    "read_package": "pnc_net.wire",
    "write_package": "pnc_net.wire",
}
__all__ = [  # the same names as _API (tests/test_api.py checks it), spelled out for tools
    "Branch", "CloneConfig", "CloneResult", "Dataset", "Manifest", "Package", "SourceSpec",
    "Superbody", "Zoo", "__version__", "build_superbody", "clone", "clone_metrics",
    "clone_modules",
    "load_dataset", "load_mnist", "read_package", "verify", "write_package",
]

if TYPE_CHECKING:
    from pnc_net.cloning import CloneConfig, CloneResult, SourceSpec, clone
    from pnc_net.data import Dataset, load_dataset, load_mnist
    from pnc_net.metrics import clone_metrics
    from pnc_net.modules_api import clone_modules
    from pnc_net.package import Package
    from pnc_net.rebuild import build_superbody, verify
    from pnc_net.superbody import Branch, Superbody
    from pnc_net.wire import read_package, write_package
    from pnc_net.zoo import Manifest, Zoo


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'pnc_net' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
