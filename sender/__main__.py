"""``python -m sender ARGS`` is ``pnc sender serve ARGS``."""

import sys

from pnc_cli import main

sys.argv = [sys.argv[0], "sender", "serve", *sys.argv[1:]]
main()
