"""The top-level API: every name ``pnc_net`` offers resolves, and importing it is light."""

from __future__ import annotations

import subprocess
import sys

import pnc_net


def test_every_public_name_resolves_to_its_module():
    assert set(pnc_net.__all__) - {"__version__"} == set(pnc_net._API)
    for name, module in pnc_net._API.items():
        value = getattr(pnc_net, name)
        assert value.__module__ == module, (name, value.__module__)


def test_an_unknown_name_is_an_attribute_error():
    try:
        pnc_net.no_such_thing  # noqa: B018 - the lookup is the test
    except AttributeError as err:
        assert "no_such_thing" in str(err)
    else:
        raise AssertionError("pnc_net.no_such_thing resolved")


def test_importing_pnc_net_does_not_load_torch():
    code = "import sys, pnc_net; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout.strip()
    assert out == "False"
