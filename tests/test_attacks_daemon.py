"""Every decoder attack of issue 13, sent to real daemons: refused, nothing stored, the
daemon serving with its memory within the budget, and the next honest package delivered."""

from __future__ import annotations

import copy
from pathlib import Path

import grpc
import pytest
from test_decode_budget import ATTACKS, MEMORY_BUDGET_MB

from pnc_cli.daemons import spawn_daemon, stop_daemon
from pnc_net import wire
from pnc_net._proto import transport_pb2 as tpb
from pnc_net.fsutil import sha256_bytes
from pnc_net.serve.client import PncClient

pytestmark = [pytest.mark.grpc, pytest.mark.slow]
REFUSED = {"INVALID_ARGUMENT", "FAILED_PRECONDITION"}


def _peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory (VmHWM), MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc status")


def _write(addr: str, data: bytes) -> str:
    """One raw Write of ``data`` as a package; the status code name."""
    name = f"packages/{sha256_bytes(data)}/{len(data)}"
    with PncClient(addr, max_attempts=1) as c:
        chunks = [data[i:i + (1 << 20)] for i in range(0, len(data), 1 << 20)] or [b""]
        requests = [tpb.WriteRequest(resource_name=name if i == 0 else "",
                                     write_offset=sum(map(len, chunks[:i])), data=chunk,
                                     finish_write=i == len(chunks) - 1)
                    for i, chunk in enumerate(chunks)]
        try:
            c.bytestream.Write(iter(requests), timeout=60)
            return "OK"
        except grpc.RpcError as err:
            return err.code().name


@pytest.mark.parametrize("role", ["receiver", "sender"])
def test_every_attack_is_refused_and_the_daemon_keeps_serving(role, tmp_path, zoo_dir,
                                                              default_clone):
    honest = wire.encode(default_clone.package)
    msg = wire.to_proto(default_clone.package)
    attacks = {name: make(copy.deepcopy(msg)) for name, make in ATTACKS.items()}
    args = ["--listen", "127.0.0.1:0", "--store", str(tmp_path / "store")]
    args += ["--zoo", str(zoo_dir)] if role == "receiver" else []
    proc, port = spawn_daemon(role, args)
    addr = f"127.0.0.1:{port}"
    try:
        with PncClient(addr) as c:  # warm: the zoo is loaded, a first call is served
            assert c.health() == "SERVING"
        before = _peak_rss_mb(proc.pid)
        codes = {name: _write(addr, data) for name, data in attacks.items()}
        assert {n: c for n, c in codes.items() if c not in REFUSED} == {}, codes
        grown = _peak_rss_mb(proc.pid) - before
        assert grown < MEMORY_BUDGET_MB, f"{role} grew by {grown:.0f} MB"
        assert proc.poll() is None
        assert list((tmp_path / "store" / "packages").glob("*.pnc")) == []
        with PncClient(addr) as c:
            c.send_package(honest)
            assert c.last_write.state == ("verified" if role == "receiver" else "stored")
            assert [p.id for p in c.list()] == [sha256_bytes(honest)]
    finally:
        stop_daemon(proc)
