"""Sender assembly: a storing ``Node`` behind the gRPC services, plus pushers."""

from __future__ import annotations

import logging

from pnc_net.serve.daemon import Metrics, announce, run_main, run_until_signal, setup_logging
from pnc_net.serve.node import Node
from pnc_net.serve.server import Daemon, build_server
from pnc_net.serve.store import PackageStore
from pnc_net.zoo import Zoo
from sender.config import SenderConfig
from sender.push import Pusher, StoreWatcher

log = logging.getLogger("pnc.sender")


class SenderDaemon(Daemon):
    watcher: StoreWatcher

    def stop(self, grace_s: float = 10.0) -> None:
        self.watcher.stop()
        super().stop(grace_s)


def create_server(cfg: SenderConfig) -> tuple[SenderDaemon, int]:
    """A started sender with one pusher per receiver; ``(daemon, bound port)``."""
    metrics = Metrics("sender")
    store = PackageStore(cfg.store)
    node = Node("sender", store, Zoo(cfg.zoo) if cfg.zoo else None, metrics=metrics)
    pushers = [Pusher(store, a, cfg.client_kwargs(), cfg.resync_s) for a in cfg.push_to]
    watcher = StoreWatcher(store, pushers, cfg.poll_s)
    base = build_server(node, cfg.listen, cfg.tokens(), cfg.tls(), cfg.limits(),
                        on_package=watcher.notify)
    daemon = SenderDaemon(base.server, base.port, base.health, base.servicer)
    daemon.watcher = watcher
    for p in pushers:
        p.start()
    watcher.start()
    if cfg.metrics_port is not None:
        log.info("metrics", extra={"port": metrics.start(cfg.metrics_port)})
    return daemon, daemon.port


def main(argv: list[str] | None = None) -> None:
    """``python -m sender ARGS`` and ``pnc sender serve ARGS``."""
    run_main(lambda: serve(SenderConfig.load(argv)))


def serve(cfg: SenderConfig) -> None:
    """Run a sender until SIGTERM or SIGINT."""
    setup_logging()
    daemon, port = create_server(cfg)
    announce("sender", cfg.listen, port)
    log.info("serving", extra={"port": port, "store": str(cfg.store),
                               "push_to": list(cfg.push_to)})
    run_until_signal(daemon, grace_s=cfg.grace_s)
