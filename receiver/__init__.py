"""The receiver daemon: accepts packages, rebuilds and verifies superbodies, serves Predict.

``create_server(ReceiverConfig(...)) -> (daemon, port)`` starts it; ``serve(cfg)``
runs it until SIGTERM. The CLI is ``pnc receiver serve``.
"""

from receiver.config import ReceiverConfig
from receiver.server import create_server, main, serve

__all__ = ["ReceiverConfig", "create_server", "main", "serve"]
