"""The receiver's settings, validated once: flags > PNC_* env vars > a TOML file > defaults."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pnc_net.errors import InvalidInputError
from pnc_net.rebuild import MAX_FINGERPRINT_TOLERANCE
from pnc_net.serve.channel import check_address
from pnc_net.serve.daemon import Flag
from pnc_net.serve.server import COMMON_FLAGS, ServerSettings

FLAGS = (
    Flag("listen", "--listen", "HOST:PORT [127.0.0.1:7100].", env="PNC_RECEIVER_LISTEN"),
    Flag("zoo", "--zoo", "Zoo folder.", env="PNC_ZOO"),
    Flag("store", "--store", "Package store folder.", env="PNC_RECEIVER_STORE"),
    Flag("mirrors", "--mirror", "Peer to fetch missing zoo models from (repeatable).",
         repeat=True),
    Flag("repair_data", "--repair-data",
         "Labelled .npz for repairing packages that miss their fingerprint."),
    Flag("catch_up_from", "--catch-up-from", "Sender HOST:PORT to catch up with on start."),
    Flag("peer_token", "--peer-token", "Token for mirrors and the sender (default: --token)."),
    Flag("torch_threads", "--torch-threads", "torch threads per process [1].", type=int),
    Flag("max_tolerance", "--max-tolerance", "The largest fingerprint error this receiver "
         f"accepts; a package may ask for less [{MAX_FINGERPRINT_TOLERANCE}].", type=float),
    Flag("trust", "--trust", "Accept only packages signed by these ed25519 keys: .pub files "
         "or hex keys, comma separated or repeated (docs/security.md).", repeat=True,
         env="PNC_TRUST"),
    Flag("predict_batch", "--predict-batch", "Predict: at most this many images of queued "
         "requests in one forward; 0 turns batching off [64].", type=int,
         env="PNC_PREDICT_BATCH"),
    Flag("predict_workers", "--predict-workers", "Predict: forward threads; 0 = one per core "
         "(at most 4) [0].", type=int, env="PNC_PREDICT_WORKERS"),
    Flag("predict_engine", "--predict-engine", "Predict: jit (the superbody traced, frozen "
         "and checked against eager within the fingerprint tolerance at load; eager if the "
         "check fails) or eager [jit].", env="PNC_PREDICT_ENGINE"),
    Flag("device", "--device", "Predict and repair: cpu, auto (the first GPU when one is "
         "visible) or cuda[:N]; verification always runs on the CPU, where fingerprints "
         "are made [cpu].", env="PNC_RECEIVER_DEVICE"),
    *COMMON_FLAGS,
)


@dataclass(frozen=True, kw_only=True)
class ReceiverConfig(ServerSettings):
    """A receiver: its zoo, its store, its peers; the rest is ``ServerSettings``."""

    zoo: Path
    store: Path
    listen: str = "127.0.0.1:7100"
    mirrors: tuple[str, ...] = ()
    repair_data: Path | None = None
    catch_up_from: str | None = None  # the sender to catch up with on start
    peer_token: str | None = None  # token for mirrors and the sender (default: token)
    torch_threads: int = 1  # per process: calls run in parallel on the thread pool instead
    max_tolerance: float = MAX_FINGERPRINT_TOLERANCE  # a package may ask for less, not more
    # images per batched forward: with the jit engine 64 beat 32 by ~10% (eager: 32 beat 16
    # and 64); bench/results/predict_throughput.json
    predict_batch: int = 64
    predict_workers: int = 0
    predict_engine: str = "jit"  # pnc_net/serve/fastpath.py: jit (checked at load) or eager
    trust: tuple[str, ...] = ()  # trusted publisher keys, as hex (given as .pub files or hex)
    device: str = "cpu"  # Predict and repair (pnc_net/devices.py); resolved when loaded

    SECTION = "receiver"
    DESCRIPTION = "Accept packages, rebuild and verify superbodies, serve Predict and Read."
    FLAGS = FLAGS
    PATH_FIELDS = ("zoo", "store", "tls_cert", "tls_key", "tls_ca", "repair_data")

    def __post_init__(self) -> None:
        self.check_server_settings()
        object.__setattr__(self, "mirrors", tuple(self.mirrors))
        for m in (*self.mirrors, *([self.catch_up_from] if self.catch_up_from else [])):
            check_address(m)
        if self.tls_ca is not None and self.tls_cert is None:
            raise InvalidInputError("--tls-ca (mTLS) needs --tls-cert and --tls-key")
        if self.repair_data is not None and not self.repair_data.is_file():
            raise InvalidInputError(f"--repair-data {self.repair_data} is not a file")
        if not 1 <= self.torch_threads <= 256:
            raise InvalidInputError("--torch-threads must be 1..256")
        if self.predict_batch < 0 or self.predict_workers < 0:
            raise InvalidInputError("--predict-batch and --predict-workers must be >= 0")
        if self.predict_engine not in ("jit", "eager"):  # fastpath.ENGINES (no torch here)
            raise InvalidInputError(f"--predict-engine {self.predict_engine!r}: use jit or eager")
        if not 0 <= self.max_tolerance <= 1:
            raise InvalidInputError("--max-tolerance must be within [0, 1]")
        from pnc_net.devices import resolve_device
        object.__setattr__(self, "device", resolve_device(self.device))  # cuda without a GPU
        from pnc_net.signing import parse_trust

        object.__setattr__(self, "trust", tuple(k.hex() for k in parse_trust(self.trust)))

    def trusted_keys(self) -> tuple[bytes, ...]:
        """The raw public keys ``--trust`` names (empty: unsigned packages are accepted)."""
        return tuple(bytes.fromhex(k) for k in self.trust)

    def client_kwargs(self) -> dict:
        """How the receiver connects to its mirrors and its sender."""
        return {"token": self.peer_token or self.token}
