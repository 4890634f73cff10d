"""``pnc jobs``: submit batch clone specs to a Ray cluster and follow them.

A thin wrapper of Ray's ``JobSubmissionClient`` for users who prefer one tool;
``ray job submit ... -- python -m pnc_net.jobs SPEC --store DIR`` does the same.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from pnc_cli.common import JsonOpt, console, err_console, print_json
from pnc_net.errors import InvalidInputError, NotFoundError, PncError, PreconditionError

jobs_app = typer.Typer(help="Batch clone jobs on a Ray cluster (submit, status, logs).",
                       no_args_is_help=True)
DEFAULT_DASHBOARD = "http://127.0.0.1:8265"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
# Bulky folders that git ignores through .git/info/exclude (Ray reads only .gitignore).
UPLOAD_EXCLUDES = [".git", ".venv", ".gpu", ".whl", ".gl", "runs", "out", "*.pnc"]

AddressOpt = Annotated[str, typer.Option(
    "--address", envvar="RAY_DASHBOARD_ADDRESS",
    help="The cluster's job server (the head's dashboard), e.g. http://127.0.0.1:8265.")]


def client(address: str):
    """A ``JobSubmissionClient``, or a one-line error when nothing answers there."""
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PreconditionError(
            f"no Ray job server answers at {address} ({first[:160]}); start a head with "
            "`ray start --head --dashboard-host=127.0.0.1` or pass --address") from None


def entrypoint(spec: Path, working_dir: Path, store: str | None, publish: str | None,
               workers: int | None) -> str:
    """The job's command line; the spec must travel inside the working directory."""
    from pnc_net.jobs import load_spec

    if (store is None) == (publish is None):
        raise InvalidInputError("give exactly one of --store DIR or --publish HOST:PORT")
    load_spec(spec)  # refuse an unusable spec before anything is uploaded
    try:
        rel = spec.resolve().relative_to(working_dir.resolve())
    except ValueError:
        raise InvalidInputError(f"spec {spec} is outside --working-dir {working_dir}; "
                                "the job only sees files inside it") from None
    args = ["python", "-m", "pnc_net.jobs", rel.as_posix()]
    args += ["--store", str(Path(store).resolve())] if store else ["--publish", publish]
    args += ["--workers", str(workers)] if workers else []
    return shlex.join(args)


def _status(c, job_id: str) -> str:
    try:
        return str(c.get_job_status(job_id).value)
    except RuntimeError as err:
        raise NotFoundError(f"job {job_id!r} is unknown to the cluster: "
                            f"{str(err).splitlines()[0][:160]}") from None


def wait(c, job_id: str, timeout_s: float, poll_s: float = 1.0) -> str:
    deadline = time.monotonic() + timeout_s
    status = _status(c, job_id)
    while status not in TERMINAL:
        if time.monotonic() > deadline:
            raise PncError(f"job {job_id} is still {status} after {timeout_s:.0f} s; "
                           f"follow it with `pnc jobs status {job_id}`")
        time.sleep(poll_s)
        status = _status(c, job_id)
    return status


@jobs_app.command("submit")
def submit_cmd(
    spec: Annotated[Path, typer.Argument(help="YAML or JSON list of clone tasks.")],
    store: Annotated[str | None, typer.Option(
        "--store", help="Package store folder (on the head node) for the packages.")] = None,
    publish: Annotated[str | None, typer.Option(
        "--publish", help="Sender HOST:PORT to publish the packages to.")] = None,
    address: AddressOpt = DEFAULT_DASHBOARD,
    working_dir: Annotated[Path, typer.Option(
        "--working-dir", help="Folder uploaded to the cluster (holds pnc and the spec).")] = Path("."),
    zoo_dir: Annotated[Path | None, typer.Option(
        "--zoo", help="Zoo folder on the head node (default: $PNC_ZOO there).")] = None,
    workers: Annotated[int | None, typer.Option(
        "--workers", help="CloneWorker actors (default: one per GPU, else per CPU).")] = None,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="Return once submitted.")] = False,
    timeout_s: Annotated[float, typer.Option("--timeout", help="Seconds to wait.")] = 3600,
    json_out: JsonOpt = False,
) -> None:
    """Submit SPEC as a Ray job; wait for it and print its logs (summary + JSON lines)."""
    if not spec.is_file():
        raise NotFoundError(f"spec {spec} does not exist")
    command = entrypoint(spec, working_dir, store, publish, workers)
    zoo = zoo_dir or (Path(os.environ["PNC_ZOO"]) if os.environ.get("PNC_ZOO") else None)
    env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
    if zoo:
        env["PNC_ZOO"] = str(zoo.resolve())
    c = client(address)
    try:
        job_id = c.submit_job(entrypoint=command, runtime_env={
            "working_dir": str(working_dir), "excludes": UPLOAD_EXCLUDES, "env_vars": env})
    except (RuntimeError, ValueError, OSError) as err:
        raise PreconditionError(f"the cluster at {address} refused the job: "
                                f"{str(err).strip().splitlines()[0][:200]}") from None
    if no_wait:
        print_json({"job_id": job_id}) if json_out else console.print(f"submitted {job_id}")
        return
    err_console.print(f"[dim]submitted {job_id}; waiting[/]", highlight=False)
    status = wait(c, job_id, timeout_s)
    logs = c.get_job_logs(job_id)
    if json_out:
        print_json({"job_id": job_id, "status": status, "logs": logs})
    else:
        sys.stdout.write(logs)  # JSON lines must not be re-wrapped
    if status != "SUCCEEDED":
        raise PncError(f"job {job_id} ended {status}; see `pnc jobs logs {job_id}`")


@jobs_app.command("status")
def status_cmd(job_id: Annotated[str, typer.Argument(help="The id `submit` printed.")],
               address: AddressOpt = DEFAULT_DASHBOARD, json_out: JsonOpt = False) -> None:
    """Print a job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)."""
    status = _status(client(address), job_id)
    print_json({"job_id": job_id, "status": status}) if json_out else console.print(status)


@jobs_app.command("logs")
def logs_cmd(job_id: Annotated[str, typer.Argument(help="The id `submit` printed.")],
             address: AddressOpt = DEFAULT_DASHBOARD) -> None:
    """Print a job's output so far."""
    c = client(address)
    _status(c, job_id)
    sys.stdout.write(c.get_job_logs(job_id))


def register(app: typer.Typer) -> None:
    """Add ``pnc jobs`` to ``app``."""
    app.add_typer(jobs_app, name="jobs")
