"""Signed packages from trusted publishers (issue 13, item 5): sign/verify, key rotation,
rollback, a receiver daemon started with --trust, and the keys/sign/verify commands."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from pnc_net import codec, signing, wire
from pnc_net._proto import package_pb2 as pb
from pnc_net.errors import InvalidInputError, PermissionDeniedError
from pnc_net.fsutil import sha256_bytes

DATA = Path(__file__).parent / "data"
CLI = [sys.executable, "-c", "import pnc_cli; pnc_cli.main()"]


@pytest.fixture(scope="module")
def old_bytes() -> bytes:
    return (DATA / "package_v1_fp16.pnc").read_bytes()


@pytest.fixture(scope="module")
def keys():
    return {name: signing.generate_key() for name in ("old", "new", "other")}


def tamper_tensor(data: bytes) -> bytes:
    """The package with one byte of a tensor flipped, re-compressed (a valid frame)."""
    raw = bytearray(codec.decompress(data))
    msg = pb.Package()
    msg.ParseFromString(bytes(raw))
    t = msg.modules[0].tensors[0].data
    at = bytes(raw).find(t)
    assert at > 0
    raw[at + 1] ^= 0x01  # a low mantissa bit: still finite, still decodes
    return codec.compress(bytes(raw))


# ----------------------------------------------------------------------------- library


def test_old_packages_decode_unsigned_and_unnamed(old_bytes):
    for f in ("package_v1_fp16.pnc", "package_v1_int8.pnc"):
        pkg = wire.decode((DATA / f).read_bytes())
        assert (pkg.name, pkg.version, pkg.signer) == ("", 0, None)
    assert signing.signature_of(old_bytes) is None
    with pytest.raises(PermissionDeniedError, match="unsigned"):
        signing.verify(old_bytes, [])


def test_sign_then_verify(old_bytes, keys):
    priv, pub = keys["old"]
    signed = signing.sign(old_bytes, priv, "digits-56", 3)
    found = signing.verify(signed, [pub])
    assert (found.key_id, found.name, found.version) == (signing.key_id(pub), "digits-56", 3)
    pkg = wire.decode(signed)
    assert (pkg.name, pkg.version, pkg.signer) == ("digits-56", 3, found.key_id)
    assert pkg.format_version == wire.decode(old_bytes).format_version  # no format bump
    # the content is untouched: same modules and tensors as before signing
    old_msg, new_msg = codec.parse(old_bytes), codec.parse(signed)
    new_msg.ClearField("signature")
    new_msg.name, new_msg.version = "", 0
    assert new_msg == old_msg
    assert signing.sign(old_bytes, priv, "digits-56", 3) == signed  # ed25519 is deterministic


def test_unsigned_wrong_key_tampered(old_bytes, keys):
    priv, pub = keys["old"]
    signed = signing.sign(old_bytes, priv, "digits", 1)
    with pytest.raises(PermissionDeniedError, match="unsigned"):
        signing.verify(old_bytes, [pub])
    with pytest.raises(PermissionDeniedError, match="not trusted"):
        signing.verify(signed, [keys["other"][1]])
    bad = tamper_tensor(signed)
    wire.decode(bad)  # still a well-formed package...
    with pytest.raises(PermissionDeniedError, match="altered|forged"):
        signing.verify(bad, [pub])  # ...whose signature no longer matches
    # name or version changed after signing
    msg = codec.parse(signed)
    msg.version = 9
    with pytest.raises(PermissionDeniedError, match="altered|forged"):
        signing.verify(codec.compress(msg.SerializeToString()), [pub])
    # a second signature record appended
    extra = pb.Package(signature=msg.signature).SerializeToString()
    twice = codec.compress(codec.decompress(signed) + extra)
    with pytest.raises(PermissionDeniedError, match="2 signature records"):
        signing.verify(twice, [pub])


def test_rotation(old_bytes, keys):
    """Trust {old, new} while packages move to the new key, then trust {new} only."""
    by_old = signing.sign(old_bytes, keys["old"][0], "digits", 1)
    by_new = signing.sign(by_old, keys["new"][0], "digits", 2)  # re-signing replaces
    both = [keys["old"][1], keys["new"][1]]
    assert signing.verify(by_old, both).key_id == signing.key_id(keys["old"][1])
    assert signing.verify(by_new, both).key_id == signing.key_id(keys["new"][1])
    assert signing.verify(by_new, [keys["new"][1]]).version == 2
    with pytest.raises(PermissionDeniedError, match="not trusted"):
        signing.verify(by_old, [keys["new"][1]])


@pytest.mark.parametrize("field,value,needle", [
    ("name", "x" * 200, "too long"), ("name", "bad\nname", "not printable"),
    ("name", " pad", "padded"), ("version", 1 << 60, "version"),
])
def test_identity_is_validated(old_bytes, field, value, needle):
    msg = codec.parse(old_bytes)
    msg.name, msg.version = "digits", 1
    setattr(msg, field, value)
    with pytest.raises(InvalidInputError, match=needle):
        wire.decode(codec.compress(msg.SerializeToString()))


def test_signature_sizes_and_names_are_validated(old_bytes, keys):
    msg = codec.parse(signing.sign(old_bytes, keys["old"][0], "digits", 1))
    short = pb.Package()
    short.CopyFrom(msg)
    short.signature.signature = b"\0" * 63
    with pytest.raises(InvalidInputError, match="ed25519 needs"):
        wire.decode(codec.compress(short.SerializeToString()))
    msg.name, msg.version = "", 0
    with pytest.raises(InvalidInputError, match="signed but has no name"):
        wire.decode(codec.compress(msg.SerializeToString()))
    unnamed = codec.parse(old_bytes)
    unnamed.version = 4
    with pytest.raises(InvalidInputError, match="no name"):
        wire.decode(codec.compress(unnamed.SerializeToString()))
    for name, version in (("", 1), ("digits", 0), ("digits", -1)):
        with pytest.raises(InvalidInputError):
            signing.sign(old_bytes, keys["old"][0], name, version)


def test_key_files(tmp_path):
    key_path, pub_path, kid = signing.write_key_pair(tmp_path / "k", "publisher")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert key_path.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    pub = signing.parse_public_key(str(pub_path))
    assert signing.key_id(pub) == kid and len(pub_path.read_text().strip()) == 64
    assert signing.parse_trust([f"{pub_path},{pub.hex()}", pub.hex()]) == (pub,)
    with pytest.raises(InvalidInputError, match="never overwritten"):
        signing.write_key_pair(tmp_path / "k", "publisher")
    with pytest.raises(InvalidInputError, match="not the .key"):
        signing.parse_public_key(str(key_path))
    with pytest.raises(InvalidInputError, match="neither"):
        signing.parse_trust("nope")
    priv = signing.load_private_key(key_path)
    assert signing._raw_public(priv) == pub
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == ["publisher.key",
                                                                  "publisher.pub"]


def test_receiver_config_trust(tmp_path, keys):
    from receiver.config import ReceiverConfig

    pub_file = tmp_path / "a.pub"
    pub_file.write_text(keys["old"][1].hex() + "\n")
    cfg = ReceiverConfig.load(["--zoo", str(tmp_path), "--store", str(tmp_path / "s"),
                               "--trust", f"{pub_file},{keys['new'][1].hex()}",
                               "--trust", keys["other"][1].hex()])
    assert cfg.trusted_keys() == (keys["old"][1], keys["new"][1], keys["other"][1])
    with pytest.raises(InvalidInputError):
        ReceiverConfig.load(["--zoo", str(tmp_path), "--store", str(tmp_path / "s"),
                             "--trust", "zz"])


# ----------------------------------------------------------------------------- node


@pytest.fixture(scope="module")
def pkg_bytes(default_clone) -> bytes:
    return wire.encode(default_clone.package)


def test_node_rollback(tmp_path, zoo_dir, pkg_bytes, default_clone, keys):
    from pnc_net.serve.node import Node
    from pnc_net.serve.store import PackageStore
    from pnc_net.zoo import Zoo

    priv, pub = keys["old"]
    node = Node("receiver", PackageStore(tmp_path), Zoo(zoo_dir), trust=[pub])
    with pytest.raises(PermissionDeniedError, match="unsigned"):
        node.accept(pkg_bytes)
    v2 = signing.sign(pkg_bytes, priv, "digits", 2)
    rec = node.accept(v2)
    assert rec.state == "verified", rec.detail
    assert (rec.metadata["name"], rec.metadata["version"]) == ("digits", 2)
    assert rec.metadata["signer"] == signing.key_id(pub)
    assert node.accept(v2).id == rec.id  # the same package again: its record
    v1 = signing.sign(pkg_bytes, priv, "digits", 1)
    with pytest.raises(PermissionDeniedError, match="rollback"):
        node.accept(v1)
    other_v2 = signing.sign(wire.encode(default_clone.package, "fp32"), priv, "digits", 2)
    with pytest.raises(PermissionDeniedError, match="rollback.*same version"):
        node.accept(other_v2)
    assert node.store.ids() == [rec.id]
    # a restarted node rebuilds the rule from its records; without --trust unsigned
    # packages are accepted, but named ones are still rollback-checked
    restarted = Node("receiver", PackageStore(tmp_path), Zoo(zoo_dir))
    with pytest.raises(PermissionDeniedError, match="rollback"):
        restarted.accept(v1)
    assert restarted.accept(signing.sign(pkg_bytes, priv, "digits", 3)).state == "verified"
    assert restarted.accept(pkg_bytes).state == "verified"  # unnamed: no version to check
    assert len(restarted.store.ids()) == 3


# ----------------------------------------------------------------------------- daemon


@pytest.fixture(scope="module")
def trusting_receiver(tmp_path_factory, zoo_dir, keys):
    from pnc_cli.daemons import spawn_daemon, stop_daemon

    root = tmp_path_factory.mktemp("trusting")
    pub_file = root / "publisher.pub"
    pub_file.write_text(keys["old"][1].hex() + "\n")
    store = root / "store"
    proc, port = spawn_daemon("receiver", ["--listen", "127.0.0.1:0", "--zoo", str(zoo_dir),
                                           "--store", str(store), "--trust",
                                           f"{pub_file},{keys['new'][1].hex()}"])
    yield f"127.0.0.1:{port}", store, proc
    stop_daemon(proc)


@pytest.mark.grpc
def test_receiver_with_trust(trusting_receiver, pkg_bytes, keys):
    from pnc_net.serve.client import PncClient

    addr, store, proc = trusting_receiver

    def held() -> list[str]:
        return sorted(p.stem for p in (store / "packages").glob("*.pnc"))

    with PncClient(addr, max_attempts=1) as c:
        for data, needle in ((pkg_bytes, "unsigned"),
                             (signing.sign(pkg_bytes, keys["other"][0], "digits", 5),
                              "not trusted"),
                             (tamper_tensor(signing.sign(pkg_bytes, keys["old"][0], "digits", 5)),
                              "altered|forged")):
            with pytest.raises(PermissionDeniedError, match=needle):
                c.send_package(data)
            assert held() == [] and proc.poll() is None
        v2 = signing.sign(pkg_bytes, keys["old"][0], "digits", 2)
        pid, _ = c.send_package(v2)
        assert c.last_write.state == "verified", c.last_write.detail
        with pytest.raises(PermissionDeniedError, match="rollback"):
            c.send_package(signing.sign(pkg_bytes, keys["new"][0], "digits", 1))
        v3 = signing.sign(pkg_bytes, keys["new"][0], "digits", 3)  # rotated key, newer version
        pid3, _ = c.send_package(v3)
        assert c.last_write.state == "verified"
        assert held() == sorted([pid, pid3])
        assert c.health() == "SERVING"


# ----------------------------------------------------------------------------- CLI


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=cwd, timeout=120,
                          check=False)


def test_cli_keys_sign_verify(tmp_path, old_bytes):
    (tmp_path / "p.pnc").write_bytes(old_bytes)
    r = run_cli("keys", "generate", "alice", "--dir", "keys", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    alice = json.loads(r.stdout)
    assert stat.S_IMODE((tmp_path / "keys" / "alice.key").stat().st_mode) == 0o600
    r = run_cli("keys", "generate", "alice", "--dir", "keys", cwd=tmp_path)
    assert r.returncode == 2 and "never overwritten" in r.stderr
    assert run_cli("keys", "generate", "bob", "--dir", "keys", cwd=tmp_path).returncode == 0
    r = run_cli("sign", "p.pnc", "--key", "keys/alice.key", "--name", "digits", "--version", "4",
                "--out", "s.pnc", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    signed = json.loads(r.stdout)
    assert signed["id"] == sha256_bytes((tmp_path / "s.pnc").read_bytes())
    assert signed["key_id"] == alice["key_id"] and (tmp_path / "p.pnc").read_bytes() == old_bytes
    r = run_cli("verify", "s.pnc", "--trust", "keys/bob.pub,keys/alice.pub", "--json",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert (got["key_id"], got["name"], got["version"]) == (alice["key_id"], "digits", 4)
    r = run_cli("verify", "s.pnc", "--trust", "keys/bob.pub", cwd=tmp_path)
    assert r.returncode == 8 and "not trusted" in r.stderr
    r = run_cli("verify", "p.pnc", "--trust", alice["public_key_hex"], cwd=tmp_path)
    assert r.returncode == 8 and "unsigned" in r.stderr
    r = run_cli("sign", "p.pnc", "--key", "keys/alice.key", "--name", "digits", "--version",
                "1", cwd=tmp_path)  # no --out: replaces the file
    assert r.returncode == 0, r.stderr
    assert signing.signature_of((tmp_path / "p.pnc").read_bytes()).version == 1


def test_cli_signing_commands_load_no_torch(tmp_path, old_bytes):
    key_path, pub_path, _ = signing.write_key_pair(tmp_path, "k")
    (tmp_path / "p.pnc").write_bytes(old_bytes)
    for argv in (["keys", "generate", "k2", "--dir", str(tmp_path)],
                 ["sign", str(tmp_path / "p.pnc"), "--key", str(key_path), "--name", "n",
                  "--version", "1"],
                 ["verify", str(tmp_path / "p.pnc"), "--trust", str(pub_path)]):
        code = ("import sys, pnc_cli\nsys.argv = ['pnc', *sys.argv[1:]]\n"
                "try:\n    pnc_cli.main()\nexcept SystemExit as e:\n    rc = e.code\n"
                "print('torch' in sys.modules, rc)")
        r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                           timeout=120, check=False)
        assert r.stdout.split()[-2:] == ["False", "0"], (argv, r.stdout, r.stderr)
