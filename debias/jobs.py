"""Run a sweep's driver as a Ray Job on the cluster's head, so it outlives the user's laptop.

`launch.py SWEEP --submit --address http://HEAD:8265` validates the file locally, uploads
this code version and the sweep file (never the venv, data or results) as the job's working
dir, and starts `python launch.py` on it there, with the same --set overrides. Relative
paths in the sweep file (`storage`, a `sqlite:///` store, `dataset.root`) resolve against
`--remote-workdir` on the head (default `~/debias-sweep`, where cluster.yaml syncs the
project), never against the job's temporary copy, so results survive the job and a
resubmitted `--resume` finds them.
`launch.py --status NAME --address ...` lists the sweep's jobs, their state and the tail of
their logs, and says where the MLflow runs are.
"""

from __future__ import annotations

import shlex
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from debias.environment import redact_uri
from debias.spec import Spec

__all__ = ["REMOTE_WORKDIR_ENV", "job_status", "submit_sweep"]

REPO = Path(__file__).resolve().parents[1]
REMOTE_WORKDIR_ENV = "DEBIAS_WORKDIR"
#: How long a submission waits for a freshly started head's job agent.
AGENT_WAIT_S = 60.0
SUBMITTED_SWEEP = "submitted_sweep.yaml"
#: Never uploaded with the job: environments, results, local stores, VCS data.
UPLOAD_EXCLUDES = [".venv", ".git", "debias_results", "mlflow.db", "mlartifacts", "data",
                   "__pycache__", "*.pyc", ".pytest_cache", ".ruff_cache"]


class JobError(RuntimeError):
    """The Jobs API could not be reached or refused the request; the message says why."""


def _client(address: str) -> Any:
    from ray.job_submission import JobSubmissionClient

    try:  # Ray >= 2.5x: heads started where a token exists require it; send ours like `ray job`
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )

        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    except ImportError:
        pass
    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # ConnectionError, or RuntimeError from the version check
        raise JobError(f"cannot reach the Ray Jobs API at {address!r} ({exc}). Pass the head's "
                       "dashboard address, e.g. --address http://127.0.0.1:8265 through "
                       "`ray dashboard cluster.yaml`.") from None


def submit_sweep(spec: Spec, sweep_file: str, overrides: Sequence[str], address: str,
                 remote_workdir: str, resume: bool = False) -> str:
    """Submit the sweep's driver as a Ray Job; returns the submission id."""
    client = _client(address)
    staging = Path(tempfile.mkdtemp(prefix="debias-job-"))
    _stage_project(staging, Path(sweep_file))
    args = ["python", "launch.py", SUBMITTED_SWEEP]
    for item in overrides:
        args += ["--set", item]
    if resume:
        args.append("--resume")
    submission_id = f"debias-{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    deadline = time.monotonic() + AGENT_WAIT_S
    try:
        while True:
            try:
                client.submit_job(
                    entrypoint=shlex.join(args),
                    submission_id=submission_id,
                    runtime_env={"working_dir": str(staging), "excludes": UPLOAD_EXCLUDES,
                                 "env_vars": {REMOTE_WORKDIR_ENV: remote_workdir,
                                              "RAY_USAGE_STATS_ENABLED": "0",
                                              "MLFLOW_DISABLE_TELEMETRY": "true"}},
                    metadata={"debias_sweep": spec.name},
                )
                break
            except Exception as exc:
                # A head that has just started answers 500 "No available agent" until its job
                # agent is up (seconds after `ray up` or `ray start --head`): wait for it.
                if "No available agent" in str(exc) and time.monotonic() < deadline:
                    time.sleep(1.0)
                    continue
                raise JobError(f"the Ray Jobs API at {address!r} refused the sweep: {exc}"
                               ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return submission_id


def _stage_project(staging: Path, sweep_file: Path) -> None:
    """The job's working dir: this code version plus the sweep file exactly as given."""
    for name in ("launch.py", "pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, staging / name)
    for folder in ("debias", "sweeps", "examples"):
        shutil.copytree(REPO / folder, staging / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy2(sweep_file, staging / SUBMITTED_SWEEP)


def job_status(name: str, address: str, log_lines: int = 15) -> tuple[str, list[Any]]:
    """A readable status of every job of sweep `name` (newest last), and the job details."""
    client = _client(address)
    jobs = sorted((j for j in client.list_jobs()
                   if (j.metadata or {}).get("debias_sweep") == name),
                  key=lambda j: j.start_time or 0)
    if not jobs:
        return f"no jobs of sweep {name!r} on {address}", []
    lines = []
    for job in jobs:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime((job.start_time or 0) / 1000))
        lines.append(f"{job.submission_id}: {job.status} (started {started})")
    last = jobs[-1]
    logs = client.get_job_logs(last.submission_id).splitlines()
    lines.append(f"\nlast {min(log_lines, len(logs))} log lines of {last.submission_id}:")
    lines += [f"  {line}" for line in logs[-log_lines:]]
    uris = {line.split("tracking: ", 1)[1] for line in logs if line.strip().startswith(
        "tracking: ")}
    where = ", ".join(sorted(redact_uri(u) for u in uris)) or "see the sweep file's tracking.uri"
    lines.append(f"\nMLflow: experiment {name!r} at {where}")
    return "\n".join(lines), jobs
