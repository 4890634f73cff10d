"""Receiver assembly: a verifying ``Node`` behind the gRPC services, plus catch-up."""

from __future__ import annotations

import logging
import threading

from pnc_net.devices import Compute
from pnc_net.serve.batcher import MicroBatcher
from pnc_net.serve.client import MirrorFetcher, PncClient
from pnc_net.serve.daemon import Metrics, announce, run_main, run_until_signal, setup_logging
from pnc_net.serve.node import Node
from pnc_net.serve.server import Daemon, build_server
from pnc_net.serve.store import PackageStore
from pnc_net.zoo import Zoo
from receiver.config import ReceiverConfig

log = logging.getLogger("pnc.receiver")


def create_server(cfg: ReceiverConfig) -> tuple[Daemon, int]:
    """A started receiver (and its catch-up thread); ``(daemon, bound port)``."""
    metrics = Metrics("receiver")
    fetcher = MirrorFetcher(cfg.mirrors, cfg.client_kwargs())
    node = Node("receiver", PackageStore(cfg.store), Zoo(cfg.zoo), fetcher, cfg.repair_data,
                metrics, max_tolerance=cfg.max_tolerance, trust=cfg.trusted_keys(),
                batcher=MicroBatcher.from_settings(cfg.predict_batch, cfg.predict_workers),
                predict_engine=cfg.predict_engine, compute=Compute(cfg.device))
    daemon = build_server(node, cfg.listen, cfg.tokens(), cfg.tls(), cfg.limits())
    if cfg.metrics_port is not None:
        log.info("metrics", extra={"port": metrics.start(cfg.metrics_port)})
    if cfg.catch_up_from:
        threading.Thread(target=catch_up, args=(node, cfg.catch_up_from, cfg.client_kwargs()),
                         daemon=True, name="catch-up").start()
    return daemon, daemon.port


def catch_up(node: Node, sender: str, client_kwargs: dict) -> int:
    """Fetch every package the sender holds and this receiver lacks (List + FindMissing + Read)."""
    fetched = 0
    try:
        with PncClient(sender, **client_kwargs) as c:
            have = {i.id: i.size_bytes for i in c.list()}
            missing = [d for d in have.items() if not node.store.has_package(d[0])]
            for pid, size in missing:
                try:
                    rec = node.accept(c.read_blob("packages", pid, size))
                    fetched += 1
                    log.info("caught up", extra={"package": pid[:12], "state": rec.state})
                except Exception as err:  # noqa: BLE001 - one bad package must not stop the rest
                    log.warning("catch-up of %s failed: %s", pid[:12], err)
    except Exception as err:  # noqa: BLE001 - the sender may be down; the daemon keeps serving
        log.warning("catch-up from %s failed: %s", sender, err)
    return fetched


def main(argv: list[str] | None = None) -> None:
    """``python -m receiver ARGS`` and ``pnc receiver serve ARGS``."""
    run_main(lambda: serve(ReceiverConfig.load(argv)))


def serve(cfg: ReceiverConfig) -> None:
    """Run a receiver until SIGTERM or SIGINT."""
    import torch

    torch.set_num_threads(cfg.torch_threads)
    setup_logging()
    daemon, port = create_server(cfg)
    daemon.servicer.node.warm.wait(120)  # announce once the zoo is in memory
    announce("receiver", cfg.listen, port)
    log.info("serving", extra={"port": port, "store": str(cfg.store), "zoo": str(cfg.zoo)})
    run_until_signal(daemon, grace_s=cfg.grace_s)
