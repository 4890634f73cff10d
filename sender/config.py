"""The sender's settings, validated once: flags > PNC_* env vars > a TOML file > defaults."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pnc_net.errors import InvalidInputError
from pnc_net.serve.channel import check_address
from pnc_net.serve.daemon import Flag
from pnc_net.serve.server import COMMON_FLAGS, ServerSettings

FLAGS = (
    Flag("listen", "--listen", "HOST:PORT [127.0.0.1:7000].", env="PNC_SENDER_LISTEN"),
    Flag("store", "--store", "Package store folder.", env="PNC_SENDER_STORE"),
    Flag("push_to", "--push-to", "Receivers HOST:PORT[,HOST:PORT...] (repeatable).",
         repeat=True),
    Flag("zoo", "--zoo", "Zoo to serve to receivers as a mirror."),
    Flag("peer_token", "--peer-token", "Token for the receivers (default: --token)."),
    Flag("peer_tls_ca", "--peer-tls-ca", "CA that signed the receivers' certificates."),
    Flag("poll_s", "--poll", "Store scan interval, s [0.2].", type=float),
    Flag("resync_s", "--resync", "Full FindMissing interval, s [5].", type=float),
    *COMMON_FLAGS,
)


@dataclass(frozen=True, kw_only=True)
class SenderConfig(ServerSettings):
    """A sender: its store, its receivers, its mirror zoo; the rest is ``ServerSettings``."""

    store: Path
    listen: str = "127.0.0.1:7000"
    push_to: tuple[str, ...] = ()
    zoo: Path | None = None  # served to receivers as a mirror
    peer_token: str | None = None  # token for the receivers (default: token)
    peer_tls_ca: Path | None = None  # CA that signed the receivers' certificates
    poll_s: float = 0.2  # how often the store is scanned for packages written by other tools
    resync_s: float = 5.0  # how often each receiver is asked what it lacks (FindMissing)

    SECTION = "sender"
    DESCRIPTION = "Serve the store, push new packages to every receiver, mirror the zoo."
    FLAGS = FLAGS
    PATH_FIELDS = ("store", "zoo", "tls_cert", "tls_key", "tls_ca", "peer_tls_ca")

    def __post_init__(self) -> None:
        self.check_server_settings()
        push = []
        for item in self.push_to:
            push.extend(a.strip() for a in str(item).split(",") if a.strip())
        object.__setattr__(self, "push_to", tuple(check_address(a) for a in push))
        if not 0.01 <= self.poll_s <= 60 or not 0.1 <= self.resync_s <= 3600:
            raise InvalidInputError("--poll must be 0.01..60 s and --resync 0.1..3600 s")

    def client_kwargs(self) -> dict:
        """How the pushers connect to the receivers."""
        return {"token": self.peer_token or self.token, "tls_ca": self.peer_tls_ca}
