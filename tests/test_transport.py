"""Library parts of the transport, without daemons: the store, resource names, uploads,
config validation, and adapter-only repair."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from lossy import damaged

from pnc_net import wire
from pnc_net.errors import InvalidInputError, NotFoundError
from pnc_net.fsutil import sha256_bytes
from pnc_net.serve.server import check_listen
from pnc_net.serve.servicer import parse_resource
from pnc_net.serve.store import PackageStore, check_digest

FIXTURE = Path(__file__).parent / "data" / "package_v1_fp16.pnc"


@pytest.fixture()
def store(tmp_path) -> PackageStore:
    return PackageStore(tmp_path / "store")


def test_store_put_get_list_prefix(store):
    data = FIXTURE.read_bytes()
    pid = store.put(data)
    assert pid == sha256_bytes(data)
    assert store.get(pid[:6]) == data and store.get(pid.upper()) == data
    [rec] = store.list()
    assert rec.id == pid and rec.state == "stored" and rec.format_version == 1
    assert store.put(data) == pid and len(store.list()) == 1  # idempotent
    assert not list(store.root.rglob("*.tmp"))  # atomic writes leave no temp files


def test_store_refuses_bad_bytes_and_paths(store):
    with pytest.raises(InvalidInputError):
        store.put(b"not a package")
    assert store.list() == []
    for bad in ("../x", "/etc/passwd", "abc", "g" * 64, "a" * 65, ""):
        with pytest.raises(InvalidInputError, match="sha256|too short"):
            store.get(bad)
    with pytest.raises(NotFoundError):
        store.get("abcdef")


def test_store_survives_a_lost_record(store):
    pid = store.put(FIXTURE.read_bytes())
    (store.packages_dir / f"{pid}.json").unlink()  # copied in by hand, say
    assert store.record(pid).id == pid and store.record(pid).state == "stored"
    assert [r.id for r in store.list()] == [pid]


def test_upload_resumes_and_checks_digest(store):
    blob = os.urandom(3000)
    up = store.upload("blobs", sha256_bytes(blob), len(blob))
    up.open(0)
    up.append(blob[:1000])
    up.close()
    resumed = store.upload("blobs", sha256_bytes(blob), len(blob))
    assert resumed.committed_size() == 1000
    with pytest.raises(InvalidInputError, match="committed size 1000"):
        resumed.open(0)
    resumed.open(1000)
    resumed.append(blob[1000:])
    assert resumed.finish().read_bytes() == blob
    wrong = store.upload("blobs", "0" * 64, 10)
    wrong.open(0)
    wrong.append(b"x" * 10)
    with pytest.raises(InvalidInputError, match="digest mismatch"):
        wrong.finish()
    assert not wrong.path.exists()


@pytest.mark.parametrize("name", ["packages/../../etc/passwd/1", "blobs/abc/1", "x/" + "a" * 64,
                                  "packages/" + "a" * 64 + "/-1", "packages", "",
                                  "packages/" + "a" * 64 + f"/{wire.MAX_PACKAGE_BYTES + 1}"])
def test_resource_names_are_not_paths(name):
    with pytest.raises(InvalidInputError):
        parse_resource(name, need_size=True)


def test_resource_name_ok():
    assert parse_resource("blobs/" + "A" * 64 + "/12", True) == ("blobs", "a" * 64, 12)
    assert check_digest("ABCD", prefix_ok=True) == "abcd"


@pytest.mark.parametrize("listen", ["0.0.0.0:7000", "[::]:7000", ":7000", "127.0.0.1:x"])
def test_wildcard_and_bad_listen_refused(listen):
    with pytest.raises(InvalidInputError):
        check_listen(listen)


def test_configs_validate(tmp_path):
    from receiver import ReceiverConfig
    from sender import SenderConfig

    cfg = SenderConfig(store=tmp_path, push_to=("127.0.0.1:1,127.0.0.1:2", "127.0.0.1:3"))
    assert cfg.push_to == ("127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3")
    with pytest.raises(InvalidInputError, match="HOST:PORT"):
        SenderConfig(store=tmp_path, push_to=("nohost",))
    with pytest.raises(InvalidInputError, match="together"):
        ReceiverConfig(zoo=tmp_path, store=tmp_path, tls_cert=tmp_path / "c")
    with pytest.raises(InvalidInputError, match="not a file"):
        ReceiverConfig(zoo=tmp_path, store=tmp_path, repair_data=tmp_path / "none.npz")


@pytest.mark.slow
def test_repair_trains_only_adapter_and_gate(zoo, default_clone, mnist):
    from pnc_net.rebuild import build_superbody, load_ref
    from pnc_net.serve.repair import RepairConfig, repair, zoo_digests
    from pnc_net.zoo import state_digest

    pkg = damaged(default_clone.package, zoo, seed=1)
    target_model = zoo.load(pkg.target.sha256)[0]
    before_target = state_digest(target_model)
    sb = build_superbody(zoo, pkg)
    _, _, shape = load_ref(zoo, pkg.target)
    names = list(sb.label_names)
    keep = [i for i, c in enumerate(mnist.y_train.tolist()) if mnist.label_names[c] in names]
    x = mnist.x_train[keep][::6]
    y = torch.tensor([names.index(mnist.label_names[c]) for c in mnist.y_train[keep][::6]])
    frozen = {k: v.clone() for k, v in sb.state_dict().items()
              if not (".adapter." in k or ".gate." in k)}
    digests = zoo_digests(sb)
    result = repair(sb, pkg.fingerprint, shape, x, y, RepairConfig(steps=25, batch=32))
    assert result.error_before > pkg.fingerprint.tolerance
    assert result.error_after < result.error_before
    assert result.zoo_digests == digests
    assert state_digest(target_model) == before_target
    after = sb.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in frozen.items())
    assert result.trained_params == sum(
        p.numel() for b in sb.branches for p in [*b.adapter.parameters(), *b.gate.parameters()])
