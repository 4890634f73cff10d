"""Regenerate (or check) the Python code generated from ``proto/``.

``python -m pnc_net.protogen`` rewrites ``pnc_net/_proto``; ``--check`` fails
when the committed code differs from what the schema generates (CI runs it).
Needs ``grpcio-tools`` (the ``test`` extra).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "pnc_net" / "_proto"


def generate(dest: Path) -> list[Path]:
    """Run protoc on every ``proto/*.proto`` into ``dest``; returns the generated files."""
    from grpc_tools import protoc

    protos = sorted(PROTO_DIR.rglob("*.proto"))
    args = ["protoc", f"-I{PROTO_DIR}", f"--python_out={dest}", f"--pyi_out={dest}",
            f"--grpc_python_out={dest}", *map(str, protos)]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted((dest / "pnc_net" / "_proto").glob("*_pb2*.py*"))


def main(argv: list[str]) -> int:
    """Rewrite ``pnc_net/_proto`` (or, with ``--check``, exit 1 if it is stale)."""
    with tempfile.TemporaryDirectory() as tmp:
        files = generate(Path(tmp))
        stale = []
        for f in files:
            mine = OUT_DIR / f.name
            if not mine.exists() or mine.read_bytes() != f.read_bytes():
                stale.append(f.name)
            if "--check" not in argv:
                shutil.copy(f, mine)
    if "--check" in argv and stale:
        print(f"generated code is stale: {', '.join(stale)}; run `python -m pnc_net.protogen`")
        return 1
    print("generated code is current" if "--check" in argv else f"wrote {len(files)} files")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
