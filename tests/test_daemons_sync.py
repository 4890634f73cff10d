"""Real senders and receivers together: push, catch-up after downtime, zoo mirroring,
repair of a lossy package, TLS, graceful shutdown, metrics and config files."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from lossy import damaged

from pnc_cli.daemons import spawn_daemon, stop_daemon
from pnc_net import wire
from pnc_net.errors import PncError
from pnc_net.fsutil import sha256_bytes, sha256_file
from pnc_net.serve.client import PncClient
from pnc_net.serve.store import PackageStore
from pnc_net.zoo import Zoo

pytestmark = pytest.mark.grpc




def wait_for(fn, timeout_s: float = 60.0, every_s: float = 0.1):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        value = fn()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"condition not met within {timeout_s} s")


def state_at(addr: str, pid: str) -> str:
    try:
        with PncClient(addr, timeout_s=5, max_attempts=1) as c:
            return c.stat(pid).state
    except PncError:
        return ""


def receiver_args(zoo: Path, store: Path, *extra: str) -> list[str]:
    return ["--listen", "127.0.0.1:0", "--zoo", str(zoo), "--store", str(store), *extra]


@pytest.fixture(scope="module")
def pkg(default_clone):
    return default_clone.package


@pytest.mark.slow
def test_sender_pushes_to_receivers_and_catches_up_after_downtime(tmp_path, zoo_dir, pkg):
    """Two receivers; one is down when the package is published and catches up on restart."""
    procs = []
    try:
        r1, p1 = spawn_daemon("receiver", receiver_args(zoo_dir, tmp_path / "r1"))
        procs.append(r1)
        # the second receiver's port is reserved by starting it once, then it goes down
        r2, p2 = spawn_daemon("receiver", receiver_args(zoo_dir, tmp_path / "r2"))
        stop_daemon(r2)
        s, ps = spawn_daemon("sender", ["--listen", "127.0.0.1:0", "--store",
                                        str(tmp_path / "s"), "--zoo", str(zoo_dir),
                                        "--push-to", f"127.0.0.1:{p1},127.0.0.1:{p2}",
                                        "--resync", "1"])
        procs.append(s)
        data = wire.encode(pkg)
        pid = PackageStore(tmp_path / "s").put(data)  # as a cluster job would
        assert wait_for(lambda: state_at(f"127.0.0.1:{p1}", pid) == "verified", 60)
        assert not (tmp_path / "r2" / "packages" / f"{pid}.pnc").exists()
        # r2 comes back on its old port and catches up by itself (List + FindMissing + Read)
        r2, _ = spawn_daemon("receiver", ["--listen", f"127.0.0.1:{p2}", "--zoo", str(zoo_dir),
                                          "--store", str(tmp_path / "r2"),
                                          "--catch-up-from", f"127.0.0.1:{ps}"])
        procs.append(r2)
        assert wait_for(lambda: state_at(f"127.0.0.1:{p2}", pid) == "verified", 60)
        with PncClient(f"127.0.0.1:{ps}") as c:  # the sender serves the same read API
            assert c.fetch_package(pid[:8]) == data
            assert c.list()[0].state == "stored"
    finally:
        for p in procs:
            stop_daemon(p)


@pytest.mark.slow
def test_receiver_fetches_missing_zoo_model_from_mirror(tmp_path, zoo_dir, pkg):
    zoo = Zoo(zoo_dir)
    source = pkg.modules[0].source.sha256
    partial = tmp_path / "partial-zoo" / "models"
    partial.mkdir(parents=True)
    for m in zoo.manifests():
        if m.sha256 != source:
            for ext in (".json", ".safetensors"):
                shutil.copy(zoo.models_dir / f"{m.sha256}{ext}", partial / f"{m.sha256}{ext}")
    data = wire.encode(pkg)
    mirror, pm = spawn_daemon("sender", ["--listen", "127.0.0.1:0", "--store",
                                         str(tmp_path / "s"), "--zoo", str(zoo_dir)])
    lone, pl = spawn_daemon("receiver", receiver_args(partial.parent, tmp_path / "r0"))
    recv, pr = spawn_daemon("receiver", receiver_args(partial.parent, tmp_path / "r1",
                                                      "--mirror", f"127.0.0.1:{pm}"))
    try:
        with (PncClient(f"127.0.0.1:{pl}") as c,  # no mirror: refused, naming the model
              pytest.raises(PncError, match=f"FAILED_PRECONDITION.*{source}")):
            c.send_package(data)
        with PncClient(f"127.0.0.1:{pr}") as c:
            c.send_package(data)
            assert c.last_write.state == "verified"
        fetched = partial / f"{source}.safetensors"
        assert sha256_file(fetched) == source
        assert sha256_file(zoo.models_dir / f"{source}.safetensors") == source  # untouched
    finally:
        for p in (mirror, lone, recv):
            stop_daemon(p)


@pytest.mark.slow
def test_receiver_repairs_a_lossy_package(tmp_path, zoo_dir, pkg, mnist):
    zoo = Zoo(zoo_dir)
    digests = {r.sha256: sha256_file(zoo.weights_path(r.sha256)) for r in pkg.zoo_refs()}
    npz = tmp_path / "repair.npz"
    np.savez(npz, x_train=mnist.x_train[::5].numpy(), y_train=mnist.y_train[::5].numpy(),
             x_test=mnist.x_test[:10].numpy(), y_test=mnist.y_test[:10].numpy(),
             label_names=np.array(mnist.label_names))
    data = wire.encode(damaged(pkg, zoo))
    plain, pp = spawn_daemon("receiver", receiver_args(zoo_dir, tmp_path / "plain"))
    fixer, pf = spawn_daemon("receiver", receiver_args(zoo_dir, tmp_path / "fix",
                                                       "--repair-data", str(npz)))
    try:
        with PncClient(f"127.0.0.1:{pp}") as c:
            pid, _ = c.send_package(data)
            info = c.stat(pid)
            assert info.state == "failed" and "no repair data" in info.detail
            with pytest.raises(PncError, match="failed verification"):
                c.predict(pid, mnist.x_test[:2])
        with PncClient(f"127.0.0.1:{pf}") as c:
            c.send_package(data)
            info = c.stat(pid)
            assert info.fingerprint_error_before > pkg.fingerprint.tolerance
            assert info.fingerprint_error < info.fingerprint_error_before
            assert info.state in ("repaired", "failed")
            if info.state == "repaired":
                assert len(c.predict(pid, mnist.x_test[:4]).predictions) == 4
    finally:
        stop_daemon(plain)
        stop_daemon(fixer)
    assert digests == {s: sha256_file(zoo.weights_path(s)) for s in digests}  # zoo untouched


def _certs(tmp: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate (cryptography)."""
    pytest.importorskip("cryptography")
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def make(cn, issuer=None, issuer_key=None, ca=False):
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        b = (x509.CertificateBuilder().subject_name(name)
             .issuer_name(issuer.subject if issuer else name).public_key(key.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now)
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            b = b.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                 x509.DNSName("localhost")]), critical=False)
        cert = b.sign(issuer_key or key, hashes.SHA256())
        return cert, key

    ca, ca_key = make("pnc-test-ca", ca=True)
    out = {}
    for role, (cert, key) in {"ca": (ca, ca_key), "server": make("127.0.0.1", ca, ca_key),
                              "client": make("client", ca, ca_key)}.items():
        out[f"{role}_cert"] = tmp / f"{role}.crt"
        out[f"{role}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out[f"{role}_key"] = tmp / f"{role}.key"
        out[f"{role}_key"].write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
    return out


def test_mtls_and_graceful_shutdown(tmp_path, zoo_dir, pkg):
    c = _certs(tmp_path)
    proc, port = spawn_daemon("receiver", receiver_args(
        zoo_dir, tmp_path / "r", "--tls-cert", str(c["server_cert"]), "--tls-key",
        str(c["server_key"]), "--tls-ca", str(c["ca_cert"]), "--metrics-port", "0"))
    addr = f"127.0.0.1:{port}"
    try:
        with PncClient(addr, tls_ca=c["ca_cert"], tls_cert=c["client_cert"],
                       tls_key=c["client_key"]) as cl:
            cl.send_package(wire.encode(pkg))
            assert cl.last_write.state == "verified"
        with (PncClient(addr, tls_ca=c["ca_cert"], max_attempts=1, timeout_s=5) as cl,
              pytest.raises(PncError, match="UNAVAILABLE")):  # no client certificate
            cl.list()
        with (PncClient(addr, max_attempts=1, timeout_s=5) as cl,  # plaintext to a TLS port
              pytest.raises(PncError, match="UNAVAILABLE")):
            cl.list()
    finally:
        assert stop_daemon(proc, signal.SIGTERM) == 0  # graceful: a clean exit status


def test_metrics_endpoint_and_config_file(tmp_path, zoo_dir):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        mport = s.getsockname()[1]
    cfg = tmp_path / "pnc.toml"
    cfg.write_text(f'[receiver]\nzoo = "{zoo_dir}"\nstore = "{tmp_path / "st"}"\n'
                   f'metrics-port = {mport}\ntoken = "from-file"\n')
    proc, port = spawn_daemon("receiver", ["--listen", "127.0.0.1:0", "--config", str(cfg)])
    try:
        with PncClient(f"127.0.0.1:{port}", "from-file") as c:
            assert c.list() == []
            c.write_blob("blobs", b"x" * 1000)
        text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10).read()
        assert b'pnc_bytes_total{direction="in"} 1000.0' in text
    finally:
        stop_daemon(proc)


@pytest.mark.parametrize("args,needle,code", [
    (["receiver", "serve", "--listen", "0.0.0.0:7100", "--zoo", "z", "--store", "s"],
     "wildcard", 2),
    (["receiver", "serve", "--listen", "127.0.0.1:0", "--store", "s"], "missing --zoo", 2),
    (["sender", "serve", "--store", "s", "--push-to", "nohost"], "HOST:PORT", 2),
    (["send", "/nonexistent.pnc", "--to", "127.0.0.1:9"], "does not exist", 3),
    (["status", "--from", "127.0.0.1:9"], "UNAVAILABLE", 7),
    (["fetch", "../x", "--from", "127.0.0.1:9", "--out", "o.pnc"], "not a sha256", 2),
    (["predict", "--from", "127.0.0.1:9", "--package", "abcd", "nope.png"], "does not exist", 3),
])
def test_cli_bad_input_is_one_line(tmp_path, args, needle, code):
    r = subprocess.run([sys.executable, "-c", "import pnc_cli; pnc_cli.main()", *args],
                       capture_output=True, text=True, cwd=tmp_path, timeout=60, check=False,
                       env={k: v for k, v in os.environ.items() if k != "PNC_ZOO"})
    assert r.returncode == code, r.stderr
    assert needle in r.stderr and "Traceback" not in r.stderr


def test_sigterm_lets_an_inflight_upload_finish(tmp_path, zoo_dir):
    """SIGTERM mid-stream: the stream in flight completes (grace), new calls are refused,
    then the daemon exits 0 with the blob stored."""
    from pnc_net._proto import transport_pb2 as tpb
    from pnc_net.serve.client import CHUNK_BYTES

    store = tmp_path / "r"
    proc, port = spawn_daemon("receiver", receiver_args(zoo_dir, store, "--grace", "60"))
    blob = os.urandom(12 * CHUNK_BYTES)
    sha = sha256_bytes(blob)
    name = f"blobs/{sha}/{len(blob)}"
    refused = []

    def slow_stream(c: PncClient):
        for i in range(12):
            if i == 4:
                proc.send_signal(signal.SIGTERM)
                time.sleep(1.5)  # the daemon is shutting down now
                try:
                    c.list()
                except PncError as err:
                    refused.append(str(err))
            yield tpb.WriteRequest(resource_name=name if i == 0 else "",
                                   write_offset=i * CHUNK_BYTES, finish_write=i == 11,
                                   data=blob[i * CHUNK_BYTES:(i + 1) * CHUNK_BYTES])
    try:
        with PncClient(f"127.0.0.1:{port}", max_attempts=1, timeout_s=60) as c:
            resp = c.bytestream.Write(slow_stream(c), timeout=60, metadata=c.metadata)
        assert resp.committed_size == len(blob)
        assert refused, "a new call was accepted during shutdown"
        assert proc.wait(60) == 0
        assert sha256_file(store / "blobs" / sha) == sha
    finally:
        stop_daemon(proc)
