"""``python -m receiver ARGS`` is ``pnc receiver serve ARGS``."""

from receiver.server import main

main()
