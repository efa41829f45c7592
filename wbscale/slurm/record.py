"""What a run remembers about its SLURM jobs: ``<run_dir>/slurm_jobs.d/`` (and the view
``<run_dir>/slurm_jobs.jsonl``).

One JSON file per event, each with an ``event``:

- ``submit``: written by ``wbscale slurm submit`` (job id, nodes, tasks, array, script,
  git commit and package versions of the submitting checkout);
- ``start``: written by each incarnation of the job as it starts (job id, restart count,
  node list; the full environment goes to ``slurm/env-<job>-<restart>.json``);
- ``preempt``: written by rank 0 when a signal made the run save and stop (step, signal,
  what it did: ``requeued`` / ``stopped`` / ``not-requeued``);
- ``cancel``: written by ``wbscale slurm cancel``.

These rows come from several machines at once (``slurm cancel`` on the login node while
the job's rank 0 writes its ``preempt`` row on a compute node), and ``O_APPEND`` to one
shared file is not atomic across NFS clients: two nodes' lines can overwrite each other.
So, as in the run registry (:mod:`wbscale.runs.store`), every event is its own file,
``slurm_jobs.d/<time_ns>-<event>-<host>-<pid>-<n>.json``, written to a temp name unique
to the host and process, fsynced and renamed into place: two writers never share a file,
and a reader sees a whole event or none.

``slurm_jobs.jsonl`` is a view for people and for tools that look for the file: after each
event its writer replaces it (by rename) with every event, one line each. Two writers at
once may leave a view that misses the other's event until the next write; nothing reads
the view for an event that has its own file. Its lines without an ``id`` are a record
written before the events had their own files (appended by older versions): they are kept
in the view and read as events. ``wbscale slurm record start RUN_DIR`` is what a job script calls.
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from wbscale.io import SAFE_NAME, atomic_write_json, read_json_folder, write_unique
from wbscale.provenance import code_version

JOBS_FILE = "slurm_jobs.jsonl"  # the view (and the whole record of runs submitted before events had files)
EVENTS_DIR = "slurm_jobs.d"  # one file per event
SLURM_DIR = "slurm"  # script copies, job logs and environment captures
_SEQ = itertools.count()


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def append_event(run_dir: Path, event: str, **fields: Any) -> dict[str, Any]:
    """Record one event of the run's jobs (its own file), then refresh the view; returns the row."""
    run_dir = Path(run_dir)
    host = socket.gethostname()
    stem = f"{time.time_ns():020d}-{SAFE_NAME.sub('_', event)}-{SAFE_NAME.sub('_', host)}-{os.getpid()}-{next(_SEQ)}"
    row = {"event": event, "time": now(), **fields, "id": stem, "host": fields.get("host", host)}
    write_unique(run_dir / EVENTS_DIR / f"{stem}.json", (json.dumps(row, sort_keys=True) + "\n").encode("utf-8"))
    try:
        _write_view(run_dir)
    except OSError:
        pass  # the view is a convenience: the event is recorded
    return row


def _legacy_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The view's lines that have no event file of their own (an old appended record)."""
    path = Path(run_dir) / JOBS_FILE
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn line (a crash mid-append)
        if isinstance(row, dict) and not row.get("id"):
            rows.append(row)
    return rows


def _file_rows(run_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for name, row in read_json_folder(Path(run_dir) / EVENTS_DIR):
        row.setdefault("id", name[: -len(".json")])
        rows.append(row)
    return rows


def _write_view(run_dir: Path) -> None:
    rows = read_events(run_dir)
    data = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode("utf-8")
    write_unique(Path(run_dir) / JOBS_FILE, data, sync=False)


def has_record(run_dir: Path) -> bool:
    """Whether the run has any job record (events or the old appended file)."""
    return (Path(run_dir) / EVENTS_DIR).is_dir() or (Path(run_dir) / JOBS_FILE).is_file()


def read_events(run_dir: Path) -> list[dict[str, Any]]:
    """All events of a run, oldest first ([] when it was never submitted): an old appended
    record's lines first (they predate every event file), then the event files by time."""
    return _legacy_rows(run_dir) + _file_rows(run_dir)


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

