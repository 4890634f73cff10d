"""``pnc jobs``: user mistakes get one line and an exit code, before anything is uploaded."""

from __future__ import annotations

import sys

import pytest


@pytest.fixture()
def pnc(monkeypatch, capsys):
    """Run ``pnc ARGS`` in process as ``main()`` does; returns (exit code, stderr)."""
    from pnc_cli import app
    from pnc_cli.common import run_guarded

    def run(*args: str) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", ["pnc", *args])
        code = run_guarded(app)
        return code, capsys.readouterr().err
    return run


@pytest.mark.parametrize("args, code, message", [
    (["jobs", "status", "raysubmit_x", "--address", "http://127.0.0.1:9"], 5,
     "no Ray job server answers at http://127.0.0.1:9"),
    (["jobs", "submit", "bench/specs/small.yaml", "--address", "http://127.0.0.1:9"], 2,
     "give exactly one of --store DIR or --publish HOST:PORT"),
    (["jobs", "submit", "no-such-spec.yaml", "--store", "x"], 3, "does not exist"),
    (["jobs", "submit", "pyproject.toml", "--store", "x"], 2, "is not readable YAML/JSON"),
])
def test_jobs_cli_mistakes_are_one_line_errors(pnc, args, code, message):
    got, err = pnc(*args)
    assert got == code, err
    assert message in " ".join(err.split())
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_spec_outside_the_working_dir_is_refused(pnc, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("- {target: a, source: b, classes: [5]}\n")
    code, err = pnc("jobs", "submit", str(spec), "--store", str(tmp_path), "--working-dir",
                    "pnc_net")
    assert code == 2 and "outside --working-dir" in err
