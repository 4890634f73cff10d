"""``python -m sender ARGS`` is ``pnc sender serve ARGS``."""

from sender.server import main

main()
