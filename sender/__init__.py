"""The sender daemon: serves its store, pushes new packages to every receiver, mirrors its zoo.

``create_server(SenderConfig(...)) -> (daemon, port)`` starts it; ``serve(cfg)`` runs
it until SIGTERM. The CLI is ``pnc sender serve``.
"""

from sender.config import SenderConfig
from sender.server import create_server, main, serve

__all__ = ["SenderConfig", "create_server", "main", "serve"]
