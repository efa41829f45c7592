"""What a run remembers about its SLURM jobs: ``<run_dir>/slurm_jobs.jsonl``.

One JSON object per line, appended, each with an ``event``:

- ``submit``: written by ``wbscale slurm submit`` (job id, nodes, tasks, array, script,
  git commit and package versions of the submitting checkout);
- ``start``: written by each incarnation of the job as it starts (job id, restart count,
  node list; the full environment goes to ``slurm/env-<job>-<restart>.json``);
- ``preempt``: written by rank 0 when a signal made the run save and stop (step, signal,
  what it did: ``requeued`` / ``stopped`` / ``not-requeued``);
- ``cancel``: written by ``wbscale slurm cancel``.

Lines are short and appended with ``O_APPEND``; a torn line (a crash mid-write) is skipped
when read. ``wbscale slurm record start RUN_DIR`` is what a job script calls.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from wbscale.io import atomic_write_json
from wbscale.provenance import code_version

JOBS_FILE = "slurm_jobs.jsonl"
SLURM_DIR = "slurm"  # script copies, job logs and environment captures


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def append_event(run_dir: Path, event: str, **fields: Any) -> dict[str, Any]:
    """Append one event line to the run's job record; returns the row."""
    row = {"event": event, "time": now(), **fields}
    path = Path(run_dir) / JOBS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(row, sort_keys=True) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return row


def read_events(run_dir: Path) -> list[dict[str, Any]]:
    """All events of a run, oldest first ([] when it was never submitted)."""
    path = Path(run_dir) / JOBS_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def job_id_from_env(env: dict[str, str] | None = None) -> str | None:
    """The id ``scontrol``/``scancel`` take for this job: ``<array job>_<task>`` in an array."""
    env = dict(os.environ) if env is None else env
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or None


def capture_start(run_dir: Path) -> Path:
    """At job start: write ``slurm/env-<job>-<restart>.json`` and a ``start`` event."""
    run_dir = Path(run_dir)
    job = job_id_from_env() or "local"
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    slurm_env = {k: v for k, v in sorted(os.environ.items()) if k.startswith("SLURM_")}
    gpus = None
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
        gpus = out.stdout.strip().splitlines() if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        pass
    env = {
        "job_id": job,
        "restart_count": restart,
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "gpus": gpus,
        "python_executable": sys.executable,
        "cwd": os.getcwd(),
        **code_version(),
        "slurm": slurm_env,
        "master": {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT")},
    }
    path = run_dir / SLURM_DIR / f"env-{job}-{restart}.json"
    atomic_write_json(path, env)
    append_event(
        run_dir, "start", job_id=job, restart_count=restart,
        nodes=os.environ.get("SLURM_JOB_NODELIST"), git_commit=env["git_commit"],
    )
    return path

