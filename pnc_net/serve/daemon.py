"""What both daemons share to run as services: logs, metrics, config files, signals.

* Structured logs: one JSON object per line on stderr (``ts``, ``level``,
  ``logger``, ``msg`` and any fields the call adds).
* Metrics: an optional Prometheus endpoint on 127.0.0.1 (bytes in/out,
  packages by state, rebuild and repair seconds), from its own registry.
* Config: flags > ``PNC_*`` environment variables > a TOML file > defaults,
  layered by ``load_settings`` from the ``Flag`` table each daemon's
  ``config.py`` declares (``SenderConfig.load(argv)``, ``ReceiverConfig.load(argv)``).
* Shutdown: SIGTERM or SIGINT sets health to NOT_SERVING and lets in-flight
  calls finish (``grace_s``) before the process exits.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pnc_net.errors import ExitCode, InvalidInputError, PncError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

D = TypeVar("D", bound="DataclassInstance")


class JsonFormatter(logging.Formatter):
    _SKIP = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        """One JSON object per record, with the fields the call added."""
        out = {"ts": round(record.created, 3), "level": record.levelname.lower(),
               "logger": record.name, "msg": record.getMessage()}
        out.update({k: v for k, v in record.__dict__.items() if k not in self._SKIP})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str = "info") -> None:
    """Send the ``pnc`` loggers to stderr as JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("pnc")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


class Metrics:
    """Prometheus counters for one daemon (``start(port)`` serves them on 127.0.0.1)."""

    def __init__(self, role: str) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self._bytes = Counter("pnc_bytes_total", "Payload bytes moved", ["direction"],
                              registry=self.registry)
        self._packages = Counter("pnc_packages_total", "Packages accepted, by state", ["state"],
                                 registry=self.registry)
        self._seconds = Histogram("pnc_step_seconds", "Rebuild and repair time", ["step"],
                                  registry=self.registry)
        self.role = role

    def bytes(self, direction: str, n: int) -> None:
        """Count payload bytes moved in ``direction`` (in or out)."""
        self._bytes.labels(direction).inc(n)

    def package(self, state: str) -> None:
        """Count one accepted package by its state."""
        self._packages.labels(state).inc()

    def observe(self, step: str, seconds: float) -> None:
        """Record the seconds one rebuild or repair took."""
        self._seconds.labels(step).observe(seconds)

    def start(self, port: int) -> int:
        """Serve the metrics on 127.0.0.1:``port`` (0 picks one); the bound port."""
        from prometheus_client import start_http_server

        server, _ = start_http_server(port, addr="127.0.0.1", registry=self.registry)
        return server.server_address[1]


def load_toml(path: Path | None, section: str) -> dict:
    """The ``[section]`` table (or the top level) of a TOML config file, keys with ``-`` -> ``_``."""
    if path is None:
        return {}
    try:
        raw = tomllib.loads(Path(path).read_text())
    except OSError as err:
        raise InvalidInputError(f"cannot read config file {path}: {err}") from None
    except tomllib.TOMLDecodeError as err:
        raise InvalidInputError(f"config file {path} is not valid TOML: {err}") from None
    table = raw.get(section, raw)
    if not isinstance(table, dict):
        raise InvalidInputError(f"config file {path}: [{section}] must be a table")
    return {k.replace("-", "_"): v for k, v in table.items() if not isinstance(v, dict)}


@dataclass(frozen=True)
class Flag:
    """One command-line option of a daemon and the config field it sets."""

    field: str  # the config dataclass field
    flag: str  # ``--listen``
    help: str
    type: Callable[[str], Any] = str
    env: str | None = None  # ``PNC_...`` variable read when the flag is not given
    repeat: bool = False  # ``--mirror A --mirror B`` -> a tuple


def parse_flags(prog: str, description: str, table: Sequence[Flag],
                argv: Sequence[str] | None) -> tuple[dict, Path | None]:
    """``argv`` -> ``({field: value}, --config path)``, environment variables filling
    the flags not given. ``--help`` prints the table and exits 0; a usage mistake
    prints argparse's usage line and exits 2."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for f in table:
        env = f" (or ${f.env})" if f.env else ""
        parser.add_argument(f.flag, dest=f.field, type=f.type, help=f.help + env,
                            metavar=f.flag.removeprefix("--").replace("-", "_").upper(),
                            action="append" if f.repeat else "store")
    parser.add_argument("--config", type=Path, help="TOML file; its table for this daemon "
                        "fills the options not given.")
    args = vars(parser.parse_args(argv))
    config = args.pop("config")
    for f in table:
        if args[f.field] is None and f.env and os.environ.get(f.env):
            value = _typed(f, os.environ[f.env])
            args[f.field] = [value] if f.repeat else value  # one value, never its letters
        if f.repeat:
            args[f.field] = tuple(args[f.field] or ())
    return args, config


def _typed(flag: Flag, text: str) -> Any:
    """An environment variable's text as the flag's type, or a one-line error."""
    try:
        return flag.type(text)
    except ValueError:
        raise InvalidInputError(f"${flag.env}={text[:80]!r} is not valid for {flag.flag}") from None


def load_settings(cls: type[D], section: str, flags: dict, config: Path | None,
                  table: Sequence[Flag] = ()) -> D:
    """The config dataclass from flags (with env vars) over the TOML file over defaults.
    File keys may be field names (``grace_s``) or flag names (``grace``, ``mirror``)."""
    aliases = {f.flag.removeprefix("--").replace("-", "_"): f.field for f in table}
    from_file = {aliases.get(k, k): v for k, v in load_toml(config, section).items()}
    values = merge(flags, from_file, {f.name for f in fields(cls)})
    missing = [f.name for f in fields(cls) if f.default is MISSING and f.name not in values]
    if missing:
        raise InvalidInputError(f"missing --{missing[0].replace('_', '-')} "
                                "(flag, $PNC_… variable or config file)")
    return cls(**values)


def run_main(fn: Callable[[], None]) -> None:
    """A daemon's entry point: a ``PncError`` is one line on stderr and its exit code."""
    try:
        fn()
    except PncError as err:
        sys.stderr.write(f"error: {err}\n")
        sys.exit(int(err.exit_code))
    except KeyboardInterrupt:
        sys.exit(int(ExitCode.INTERRUPTED))


def merge(flags: dict, file_values: dict, known: set[str]) -> dict:
    """Flags (already merged with env vars by the CLI) win; the file fills what is unset."""
    unknown = set(file_values) - known
    if unknown:
        raise InvalidInputError(f"unknown config keys {sorted(unknown)}; known: {sorted(known)}")
    out = dict(file_values)
    out.update({k: v for k, v in flags.items() if v not in (None, (), [])})
    return out


def run_until_signal(daemon, on_stop=None, grace_s: float = 10.0) -> None:
    """Block until SIGTERM/SIGINT, then shut down gracefully."""
    stop = threading.Event()

    def handler(signum, frame):
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    while not stop.wait(0.5):
        pass
    logging.getLogger("pnc.daemon").info("shutting down", extra={"grace_s": grace_s})
    if on_stop is not None:
        on_stop()
    t0 = time.perf_counter()
    daemon.stop(grace_s)
    logging.getLogger("pnc.daemon").info(
        "stopped", extra={"seconds": round(time.perf_counter() - t0, 3)})
    # Every call has finished and every write was fsynced: exit now. The interpreter's
    # own teardown (gRPC's grace thread, gRPC core and torch destructors) took 10+ s on
    # the development machine, which a supervisor would read as a hung process.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def announce(role: str, listen: str, port: int) -> None:
    """One line on stdout that scripts and tests wait for: the address really bound."""
    host = listen.rpartition(":")[0]
    sys.stdout.write(f"pnc {role} listening on {host}:{port} port={port}\n")
    sys.stdout.flush()
