"""``python -m receiver ARGS`` is ``pnc receiver serve ARGS``."""

import sys

from pnc_cli import main

sys.argv = [sys.argv[0], "receiver", "serve", *sys.argv[1:]]
main()
