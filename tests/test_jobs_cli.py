"""``pnc jobs``: user mistakes get one line and an exit code, before anything is uploaded."""

from __future__ import annotations

import subprocess
import sys

import pytest


def pnc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from pnc_cli import main; main()", *args],
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize("args, code, message", [
    (["jobs", "status", "raysubmit_x", "--address", "http://127.0.0.1:9"], 5,
     "no Ray job server answers at http://127.0.0.1:9"),
    (["jobs", "submit", "bench/specs/small.yaml", "--address", "http://127.0.0.1:9"], 2,
     "give exactly one of --store DIR or --publish HOST:PORT"),
    (["jobs", "submit", "no-such-spec.yaml", "--store", "x"], 3, "does not exist"),
    (["jobs", "submit", "pyproject.toml", "--store", "x"], 2, "is not readable YAML/JSON"),
])
def test_jobs_cli_mistakes_are_one_line_errors(args, code, message):
    proc = pnc(*args)
    assert proc.returncode == code, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_a_spec_outside_the_working_dir_is_refused(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("- {target: a, source: b, classes: [5]}\n")
    proc = pnc("jobs", "submit", str(spec), "--store", str(tmp_path), "--working-dir", "pnc_net")
    assert proc.returncode == 2 and "outside --working-dir" in proc.stderr
