"""``wbscale slurm status|cancel``: the jobs of a run as SLURM sees them now.

State comes from ``scontrol show job`` (pending, running and recently finished jobs; it
also has the requeue count), then ``sacct`` for jobs the controller has forgotten (where
accounting is on), then the run's own record (``slurm_jobs.jsonl``): the number of
incarnations that started, and whether the last one stopped for a signal.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from wbscale.errors import UserError, did_you_mean
from wbscale.slurm.record import JOBS_FILE, append_event, read_events

ACTIVE_STATES = {
    "PENDING", "RUNNING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESIZING", "SUSPENDED",
    "CONFIGURING", "COMPLETING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD",
}
TIMEOUT = 30.0


@dataclass
class JobState:
    """One job (or array task) of a run."""

    job_id: str
    state: str  # SLURM's JobState, or UNKNOWN when SLURM has forgotten it
    requeues: int | None = None
    nodes: str | None = None
    exit_code: str | None = None
    reason: str | None = None
    run_dir: str | None = None  # the run it trains (array task i: <run>-i)
    last_step: int | None = None  # newest complete checkpoint of that run
    source: str = "scontrol"

    @property
    def active(self) -> bool:
        return self.state.split()[0] in ACTIVE_STATES

    @classmethod
    def from_record(cls, job_id: str, rec: dict[str, str]) -> JobState:
        """The state in one ``scontrol -o show job`` record (:func:`_parse_scontrol`)."""
        return cls(
            job_id=job_id,
            state=rec.get("JobState", "UNKNOWN"),
            requeues=int(rec["Restarts"]) if rec.get("Restarts", "").isdigit() else None,
            nodes=rec.get("NodeList") if rec.get("NodeList") not in (None, "(null)") else None,
            exit_code=rec.get("ExitCode"),
            reason=rec.get("Reason") if rec.get("Reason") not in (None, "None") else None,
        )


def _run(args: list[str]) -> subprocess.CompletedProcess | None:
    if shutil.which(args[0]) is None:
        return None
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT)
    except (OSError, subprocess.TimeoutExpired):
        return None


def _parse_scontrol(text: str) -> list[dict[str, str]]:
    """``scontrol -o show job`` prints one ``Key=Value ...`` line per job or array task."""
    records = []
    for line in text.splitlines():
        if not line.strip():
            continue
        pairs = re.findall(r"(\w+)=(\S*)", line)
        records.append(dict(pairs))
    return records


def query_jobs(job_ids: list[str]) -> dict[str, list[JobState]]:
    """SLURM's view of each submitted id: a list (an array id has one entry per task)."""
    found: dict[str, list[JobState]] = {}
    for job_id in job_ids:
        proc = _run(["scontrol", "-o", "show", "job", job_id])
        states: list[JobState] = []
        if proc is not None and proc.returncode == 0:
            for rec in _parse_scontrol(proc.stdout):
                task = rec.get("ArrayTaskId")
                shown = f"{rec['ArrayJobId']}_{task}" if task and rec.get("ArrayJobId") else rec.get("JobId", job_id)
                states.append(JobState.from_record(shown, rec))
        if not states:
            states = _sacct(job_id)
        found[job_id] = states or [JobState(job_id=job_id, state="UNKNOWN", source="none")]
    return found


def _sacct(job_id: str) -> list[JobState]:
    proc = _run(["sacct", "-n", "-P", "-X", "-j", job_id, "-o", "JobID,State,ExitCode,NodeList"])
    if proc is None or proc.returncode != 0:
        return []
    states = []
    for line in proc.stdout.splitlines():
        parts = line.split("|")
        if len(parts) == 4:
            states.append(JobState(job_id=parts[0], state=parts[1], exit_code=parts[2], nodes=parts[3], source="sacct"))
    return states


def _task_ids(spec: str) -> list[str]:
    """``ArrayTaskId`` of a record: ``3``, or for the pending part of an array ``1-5:2,9%2``."""
    ids: list[str] = []
    for part in spec.split("%", 1)[0].split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+)(?::(\d+))?)?", part.strip())
        if not match:
            continue
        first, last, stride = match.group(1), match.group(2), match.group(3)
        if last is None:
            ids.append(first)
        else:
            ids += [str(i) for i in range(int(first), int(last) + 1, int(stride or 1))]
    return ids


def job_snapshot(job_ids: Iterable[str]) -> dict[str, JobState]:
    """SLURM's view of many jobs with one ``scontrol`` call (and one ``sacct`` for those the
    controller has forgotten): ``{id: JobState}``; an array task is ``<array>_<task>``, also
    while it is still pending inside the array's record. Ids SLURM does not know are
    missing; so is everything when SLURM's commands are not on PATH."""
    wanted = {str(j) for j in job_ids if j}
    if not wanted:
        return {}
    found: dict[str, JobState] = {}
    proc = _run(["scontrol", "-o", "show", "job"])
    if proc is not None and proc.returncode == 0:
        for rec in _parse_scontrol(proc.stdout):
            if "JobId" not in rec:
                continue
            array, task = rec.get("ArrayJobId"), rec.get("ArrayTaskId")
            names = [f"{array}_{t}" for t in _task_ids(task)] if array and task else [rec["JobId"]]
            if array and task and len(names) == 1:
                names.append(rec["JobId"])  # a task that runs has a job id of its own too
            for name in names:
                found[name] = JobState.from_record(name, rec)
    missing = sorted(wanted - found.keys())
    if missing:
        proc = _run(["sacct", "-n", "-P", "-X", "-j", ",".join(missing), "-o", "JobID,State,ExitCode,NodeList"])
        if proc is not None and proc.returncode == 0:
            for line in proc.stdout.splitlines():
                parts = line.split("|")
                if len(parts) == 4 and parts[0] in wanted:
                    found[parts[0]] = JobState(
                        job_id=parts[0], state=parts[1].split()[0] if parts[1] else "UNKNOWN",
                        exit_code=parts[2], nodes=parts[3], source="sacct",
                    )
    return {k: v for k, v in found.items() if k in wanted}


def submitted_ids(run_dir: Path) -> list[str]:
    return [str(e["job_id"]) for e in read_events(run_dir) if e.get("event") == "submit" and e.get("job_id")]


def run_status(run_dir: Path) -> list[JobState]:
    """Every job submitted for a run, with state, requeues and the last checkpoint step."""
    from wbscale.ckpt.format import latest_checkpoint  # imports torch: only here

    run_dir = Path(run_dir)
    events = read_events(run_dir)
    submits = [e for e in events if e.get("event") == "submit" and e.get("job_id")]
    starts: dict[str, int] = {}
    for e in events:
        if e.get("event") == "start":
            starts[str(e.get("job_id"))] = starts.get(str(e.get("job_id")), 0) + 1
    queried = query_jobs([str(e["job_id"]) for e in submits])
    rows: list[JobState] = []
    for e in submits:
        for job in queried[str(e["job_id"])]:
            if job.requeues is None and job.job_id in starts:
                job.requeues = max(0, starts[job.job_id] - 1)  # incarnations that started, minus the first
            task_run = run_dir
            if e.get("array") and "_" in job.job_id:
                task = job.job_id.split("_", 1)[1]
                points = e.get("points")
                if isinstance(points, list) and task.isdigit() and int(task) < len(points):
                    task_run = Path(points[int(task)])  # a sweep's array: task i trains point i
                else:  # `slurm submit --array`: task i trains run '<run>-i'
                    task_run = run_dir.parent / f"{run_dir.name}-{task}"
            ckpt = latest_checkpoint(task_run)
            job.run_dir = str(task_run)
            job.last_step = ckpt.step if ckpt is not None else None
            rows.append(job)
    return rows


def active_jobs(run_dir: Path) -> list[JobState]:
    """Jobs of a run that are still queued or running (what must not be doubled)."""
    ids = submitted_ids(run_dir)
    if not ids:
        return []
    return [j for states in query_jobs(ids).values() for j in states if j.active]


def resolve_run(run: str, runs_dir: str = "runs") -> Path:
    """A run folder given as a path, or as a run name under ``runs_dir``."""
    for candidate in (Path(run), Path(runs_dir) / run):
        if (candidate / JOBS_FILE).is_file():
            return candidate.resolve()
    known = sorted(p.parent.name for p in Path(runs_dir).glob(f"*/{JOBS_FILE}"))
    raise UserError(
        f"no SLURM jobs recorded for run '{run}' (no {run}/{JOBS_FILE} and no {runs_dir}/{run}/{JOBS_FILE})"
        + did_you_mean(run, known)
        + (f"; runs with jobs: {', '.join(known)}" if known else "; submit one with: wbscale slurm submit RECIPE")
    )


def all_runs(runs_dir: str = "runs") -> list[Path]:
    return sorted(p.parent.resolve() for p in Path(runs_dir).glob(f"*/{JOBS_FILE}"))


def format_status(run_dir: Path, rows: list[JobState]) -> str:
    header = ("JOB", "STATE", "REQUEUES", "NODES", "EXIT", "LAST CKPT", "REASON")
    table = [header] + [
        (
            r.job_id, r.state, "-" if r.requeues is None else str(r.requeues), r.nodes or "-",
            r.exit_code or "-", "-" if r.last_step is None else f"step {r.last_step}", r.reason or "",
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = [f"run {run_dir.name} ({run_dir})"]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table]
    return "\n".join(lines)


def status_dicts(run_dir: Path, rows: list[JobState]) -> dict[str, Any]:
    return {"run_dir": str(run_dir), "jobs": [asdict(r) for r in rows]}


def cancel(run_dir: Path) -> list[str]:
    """scancel every queued or running job of a run; returns the ids cancelled.

    A running job gets SIGTERM first: it saves a checkpoint at its next step and exits.
    """
    jobs = active_jobs(run_dir)
    if not jobs:
        return []
    if shutil.which("scancel") is None:
        raise UserError("'scancel' not found on PATH: run this on the cluster's login node")
    ids = [j.job_id for j in jobs]
    proc = subprocess.run(["scancel", *ids], capture_output=True, text=True, timeout=TIMEOUT)
    if proc.returncode != 0:
        raise UserError(f"scancel {' '.join(ids)} failed: {(proc.stderr or proc.stdout).strip()}")
    append_event(run_dir, "cancel", job_ids=ids)
    return ids
