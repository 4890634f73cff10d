"""The receiver's settings, validated once (flags, PNC_* env vars or a TOML file)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from pnc_net.client import check_address
from pnc_net.errors import InvalidInputError
from pnc_net.transport import TlsFiles, check_listen


@dataclass(frozen=True)
class ReceiverConfig:
    zoo: Path
    store: Path
    listen: str = "127.0.0.1:7100"
    token: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    mirrors: tuple[str, ...] = ()
    repair_data: Path | None = None
    catch_up_from: str | None = None  # the sender to catch up with on start
    peer_token: str | None = None  # token for mirrors and the sender (default: token)
    metrics_port: int | None = None
    grace_s: float = 10.0
    torch_threads: int = 1  # per process: calls run in parallel on the thread pool instead

    def __post_init__(self) -> None:
        for name in ("zoo", "store", "tls_cert", "tls_key", "tls_ca", "repair_data"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        object.__setattr__(self, "mirrors", tuple(self.mirrors))
        check_listen(self.listen)
        for m in (*self.mirrors, *([self.catch_up_from] if self.catch_up_from else [])):
            check_address(m)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise InvalidInputError("give --tls-cert and --tls-key together")
        if self.tls_ca is not None and self.tls_cert is None:
            raise InvalidInputError("--tls-ca (mTLS) needs --tls-cert and --tls-key")
        if self.repair_data is not None and not self.repair_data.is_file():
            raise InvalidInputError(f"--repair-data {self.repair_data} is not a file")
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise InvalidInputError(f"--metrics-port {self.metrics_port} is not a port")
        if not 1 <= self.torch_threads <= 256:
            raise InvalidInputError("--torch-threads must be 1..256")
        if self.grace_s < 0:
            raise InvalidInputError("--grace must be >= 0 seconds")

    @classmethod
    def keys(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    def tls(self) -> TlsFiles | None:
        return TlsFiles(self.tls_cert, self.tls_key, self.tls_ca) if self.tls_cert else None

    def client_kwargs(self) -> dict:
        return {"token": self.peer_token or self.token}
