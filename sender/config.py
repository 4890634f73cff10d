"""The sender's settings, validated once (flags, PNC_* env vars or a TOML file)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from pnc_net.client import check_address
from pnc_net.errors import InvalidInputError
from pnc_net.transport import TlsFiles, check_listen


@dataclass(frozen=True)
class SenderConfig:
    store: Path
    listen: str = "127.0.0.1:7000"
    push_to: tuple[str, ...] = ()
    zoo: Path | None = None  # served to receivers as a mirror
    token: str | None = None
    peer_token: str | None = None  # token for the receivers (default: token)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    peer_tls_ca: Path | None = None  # CA that signed the receivers' certificates
    poll_s: float = 0.2  # how often the store is scanned for packages written by other tools
    resync_s: float = 5.0  # how often each receiver is asked what it lacks (FindMissing)
    metrics_port: int | None = None
    grace_s: float = 10.0

    def __post_init__(self) -> None:
        for name in ("store", "zoo", "tls_cert", "tls_key", "tls_ca", "peer_tls_ca"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        push = []
        for item in self.push_to:
            push.extend(a.strip() for a in str(item).split(",") if a.strip())
        object.__setattr__(self, "push_to", tuple(check_address(a) for a in push))
        check_listen(self.listen)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise InvalidInputError("give --tls-cert and --tls-key together")
        if not 0.01 <= self.poll_s <= 60 or not 0.1 <= self.resync_s <= 3600:
            raise InvalidInputError("--poll must be 0.01..60 s and --resync 0.1..3600 s")
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise InvalidInputError(f"--metrics-port {self.metrics_port} is not a port")

    @classmethod
    def keys(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    def tls(self) -> TlsFiles | None:
        return TlsFiles(self.tls_cert, self.tls_key, self.tls_ca) if self.tls_cert else None

    def client_kwargs(self) -> dict:
        return {"token": self.peer_token or self.token, "tls_ca": self.peer_tls_ca}
