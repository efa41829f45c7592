"""``wbscale runs resubmit``: start again the runs that died without finishing.

A run is resubmitted when its state (:mod:`.state`) is ``failed`` or ``stale`` — an error,
a cancel, a node failure, the OOM killer, a time limit reached without the signal — with
its own saved ``recipe.yaml`` and ``--resume auto``: it continues from its newest intact
checkpoint, with the same wandb run. Never resubmitted:

- a run that failed on bad input (exit status 2: the recipe, a flag, data that does not
  match): the same input fails the same way; fix it and start it by hand;
- a run whose retry budget is spent (``--max-retries``, default 3, counted per run over
  every ``resubmit`` event it has);
- a run that is pending, running, preempted-requeued (SLURM brings it back) or finished.

A SLURM run (one with a submit in its job record) is submitted again with
:func:`wbscale.slurm.submit.submit`, with the partition, account, time limit, QoS,
constraint and site file of its last submission, from the folder it was submitted from.
A task of a job array (``slurm submit --array``, a sweep) whose folder holds no submit of
its own is found by its job id (``<array>_<task>``) in the array's record — the folder the
job was submitted as (its start names it), the sweep folder above it, or ``<run>`` for the
task folder ``<run>-<task>`` — and submitted the same way, as one job for that task's
folder. A run trained under SLURM whose submission cannot be found is refused (resubmit it
with ``wbscale slurm submit``), never restarted here as a local process.
A local run is started again in the background on this host (``wbscale fit
<run>/recipe.yaml --resume auto``, output to ``<run>/resubmit-<n>.log``); one trained on
another host is left to that host. Each resubmission is a ``resubmit`` event of the run
(attempt, budget, the reason it died, the new job id or pid).

``--watch`` repeats this every ``--interval`` seconds (bounded: 1 s to 1 h), for
``--rounds`` rounds (default: until interrupted), e.g. on a login node; with ``--dry-run``
each round only says what it would resubmit.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from wbscale.errors import UserError
from wbscale.runs import store
from wbscale.runs.state import RunRow, find_run, list_runs
from wbscale.slurm.record import read_events as read_job_events
from wbscale.slurm.site import JobOptions

DEFAULT_MAX_RETRIES = 3
MIN_INTERVAL_S, MAX_INTERVAL_S = 1.0, 3600.0
HEALABLE = ("failed", "stale")


@dataclass
class Action:
    """What ``resubmit`` did (or would do, or refused) for one run."""

    name: str
    state: str
    reason: str
    action: str  # resubmitted | would-resubmit | skipped
    detail: str = ""
    job_id: str | None = None
    pid: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _last_submit(run_dir: Path) -> dict[str, Any] | None:
    submits = [e for e in read_job_events(run_dir) if e.get("event") == "submit" and e.get("job_id")]
    return submits[-1] if submits else None


def _last_start(run_dir: Path) -> dict[str, Any]:
    """The run's newest start: the recorder's, else the SLURM record's ({} if none)."""
    starts = [e for e in store.read_events(run_dir) if e["event"] == "start"]
    if not starts:
        starts = [e for e in read_job_events(run_dir) if e.get("event") == "start"]
    return starts[-1] if starts else {}


def _slurm_job(start: dict[str, Any]) -> str | None:
    value = start.get("job_id")
    return str(value) if value not in (None, "", "local") else None


def _array_record_dirs(run_dir: Path, start: dict[str, Any], task: str | None) -> list[Path]:
    """Where the submit record of the array a task belongs to may be, most likely first."""
    found: list[Path] = []
    if start.get("slurm_run_dir"):
        found.append(Path(str(start["slurm_run_dir"])))
    found.append(run_dir.parent)  # a sweep folder
    match = re.fullmatch(r"(.+)-(\d+)", run_dir.name)
    if match and (task is None or match.group(2) == task):
        found.append(run_dir.parent / match.group(1))  # `slurm submit --array`: <run>-<task>'s parent <run>
    unique = []
    for folder in found:
        if folder.resolve() != run_dir.resolve() and folder.resolve() not in [u.resolve() for u in unique]:
            unique.append(folder)
    return unique


def _array_submit(run_dir: Path, start: dict[str, Any], job_id: str) -> dict[str, Any]:
    """The submit record of the job array whose task ``job_id`` trained ``run_dir``, or a
    UserError that says what to do instead (never a local restart of a SLURM run)."""
    array_job, _, task = job_id.partition("_")
    looked = _array_record_dirs(run_dir, start, task or None)
    if task:
        for folder in looked:
            submits = [e for e in read_job_events(folder) if e.get("event") == "submit"
                       and str(e.get("job_id")) in (array_job, job_id)]
            if submits:
                return {**submits[-1], "array_record": str(folder)}
    where = ", ".join(str(f) for f in looked) or "nowhere"
    what = f"array task {job_id}" if task else f"SLURM job {job_id}"
    raise UserError(
        f"trained by {what}, but no `wbscale slurm submit` record of it was found (looked in {run_dir} and {where}); "
        f"submit it to SLURM again by hand: wbscale slurm submit {run_dir / 'recipe.yaml'} [--partition …]"
    )


def _submission(run_dir: Path) -> dict[str, Any] | None:
    """The submit record a SLURM run is resubmitted with (its own, or its array's); None for
    a local run. A SLURM run whose record cannot be found raises a UserError."""
    submit_event = _last_submit(run_dir)
    if submit_event is None:
        start = _last_start(run_dir)
        job_id = _slurm_job(start)
        if job_id is not None:  # an array task without a record of its own
            submit_event = _array_submit(run_dir, start, job_id)
    return submit_event


def options_from_submit(submit: dict[str, Any]) -> JobOptions:
    """The job options a run was last submitted with (nodes and GPUs come from its recipe)."""
    saved = submit.get("options") if isinstance(submit.get("options"), dict) else {}
    return JobOptions(
        partition=saved.get("partition", submit.get("partition")),
        account=saved.get("account", submit.get("account")),
        time=saved.get("time", submit.get("time_limit")),
        qos=saved.get("qos", submit.get("qos")),
        constraint=saved.get("constraint", submit.get("constraint")),
        site_path=saved.get("site_path", submit.get("site")),
    )


def refusal(row: RunRow, states: tuple[str, ...], max_retries: int) -> str | None:
    """Why ``row`` must not be resubmitted, or None."""
    if row.state not in states:
        return f"{row.state}: nothing to heal" if row.state not in HEALABLE else f"{row.state} (not selected)"
    if row.bad_input:
        return "failed on bad input (exit 2): the same input fails again; fix it and start the run by hand"
    if row.retries >= max_retries:
        return f"retry budget spent ({row.retries} of {max_retries} resubmissions)"
    return None


def _resubmit_slurm(row: RunRow, run_dir: Path, submit_event: dict[str, Any]) -> tuple[str, str]:
    """One job (never an array: a task is resubmitted alone) training ``run_dir`` from its
    saved recipe, with the job options ``submit_event`` recorded."""
    from wbscale.slurm.submit import submit

    if not (run_dir / "recipe.yaml").is_file():
        raise UserError(f"{run_dir} has no recipe.yaml to resubmit; submit it by hand with `wbscale slurm submit`")
    workdir = Path(submit_event.get("workdir") or row.workdir or Path.cwd())
    if not workdir.is_dir():
        raise UserError(f"the folder it was submitted from ({workdir}) is gone; submit it by hand with `wbscale slurm submit`")
    result = submit(str(run_dir / "recipe.yaml"), [], options_from_submit(submit_event), workdir=workdir)
    if result.run_dir.resolve() != run_dir.resolve():  # cannot happen for a folder submit wrote
        raise UserError(f"{run_dir}/recipe.yaml trains {result.run_dir}, not this folder; resubmit it by hand")
    via = f" (job options of array {submit_event['job_id']} from {submit_event['array_record']})" if submit_event.get("array_record") else ""
    return str(result.job_id), f"job {result.job_id}{via}"


def _resubmit_local(row: RunRow, run_dir: Path, attempt: int) -> tuple[int, str]:
    last = _last_start(run_dir)
    if _slurm_job(last):  # a SLURM run is never restarted as a local process
        raise UserError(f"trained by SLURM job {last['job_id']}: resubmit it with `wbscale slurm submit`")
    if last.get("host") and last["host"] != socket.gethostname():
        raise UserError(f"trained on host {last['host']}: run `wbscale runs resubmit {row.name}` there")
    if last.get("torchrun"):
        raise UserError("launched by torchrun: relaunch it the same way with `--resume auto`")
    cwd = Path(last.get("cwd") or row.workdir or Path.cwd())
    log = run_dir / f"resubmit-{attempt}.log"
    cmd = [sys.executable, "-m", "wbscale.cli", "fit", str(run_dir / "recipe.yaml"), "--resume", "auto", "--no-progress"]
    pid = _spawn(cmd, cwd, log)
    return pid, f"pid {pid} on this host (log {log})"


def _spawn(cmd: list[str], cwd: Path, log: Path) -> int:
    """Start ``cmd`` detached from this process (its own session), output to ``log``."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    return proc.pid


def resubmit(
    runs_dir: str | Path = "runs",
    names: list[str] | None = None,
    *,
    failed: bool = False,
    stale: bool = False,
    max_retries: int = DEFAULT_MAX_RETRIES,
    dry_run: bool = False,
) -> list[Action]:
    """Resubmit the named runs (any healable state), or every failed / stale one."""
    if max_retries < 0:
        raise UserError(f"--max-retries must be >= 0 (got {max_retries})")
    runs_dir = Path(runs_dir)
    if names:
        wanted = [find_run(runs_dir, n) for n in names]
        rows = list_runs(runs_dir, only=wanted)
        states: tuple[str, ...] = HEALABLE
        if len(rows) == 1 and rows[0].state not in HEALABLE:
            row = rows[0]
            raise UserError(f"run '{row.name}' is {row.state}" + (f" ({row.reason})" if row.reason else "") + ": nothing to resubmit")
    else:
        states = tuple(s for s, on in (("failed", failed), ("stale", stale)) if on)
        if not states:
            raise UserError("say which runs: a NAME, --failed, --stale (or both)")
        rows = [r for r in list_runs(runs_dir) if r.state in states]
    actions = []
    for row in rows:
        why = refusal(row, states, max_retries)
        if why is not None:
            actions.append(Action(row.name, row.state, row.reason, "skipped", why))
            continue
        run_dir = runs_dir / row.name
        attempt = row.retries + 1
        try:
            submit_event = _submission(run_dir)
            if dry_run:
                how = (f"as a SLURM job with the options of job {submit_event['job_id']}" if submit_event is not None
                       else "as a process on this host")
                actions.append(Action(row.name, row.state, row.reason, "would-resubmit",
                                      f"attempt {attempt} of {max_retries}, {how}"))
                continue
            if submit_event is not None:
                job_id, detail = _resubmit_slurm(row, run_dir, submit_event)
                pid = None
            else:
                pid, detail = _resubmit_local(row, run_dir, attempt)
                job_id = None
        except UserError as err:
            actions.append(Action(row.name, row.state, row.reason, "skipped", str(err)))
            continue
        fields: dict[str, Any] = {"job_id": job_id} if job_id else {"pid": pid, "log": str(run_dir / f"resubmit-{attempt}.log")}
        if pid is not None:
            fields["host"] = socket.gethostname()
        store.write_event(
            run_dir, "resubmit", attempt=attempt, budget=max_retries, after=row.reason, after_state=row.state, **fields,
        )
        actions.append(Action(row.name, row.state, row.reason, "resubmitted", detail, job_id=job_id, pid=pid))
    return actions


def watch(
    runs_dir: str | Path = "runs",
    *,
    failed: bool = True,
    stale: bool = True,
    max_retries: int = DEFAULT_MAX_RETRIES,
    interval: float = 300.0,
    rounds: int | None = None,
    dry_run: bool = False,
    report: Callable[[list[Action]], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> list[Action]:
    """:func:`resubmit` every ``interval`` seconds (clamped to 1 s .. 1 h), ``rounds`` times
    (``dry_run``: only say, each round, what would be resubmitted)."""
    if rounds is not None and rounds < 1:
        raise UserError(f"--rounds must be >= 1 (got {rounds})")
    interval = min(MAX_INTERVAL_S, max(MIN_INTERVAL_S, float(interval)))
    done: list[Action] = []
    n = 0
    while rounds is None or n < rounds:
        actions = resubmit(runs_dir, failed=failed, stale=stale, max_retries=max_retries, dry_run=dry_run)
        done += actions
        if report is not None:
            report(actions)
        n += 1
        if rounds is None or n < rounds:
            sleep(interval)
    return done


def format_actions(actions: list[Action]) -> str:
    if not actions:
        return "nothing to resubmit"
    width = max(len(a.name) for a in actions)
    return "\n".join(f"{a.name.ljust(width)}  {a.action:15s} {a.detail}" + (f"  [{a.state}: {a.reason}]" if a.reason else "")
                     for a in actions)


def actions_json(actions: list[Action]) -> str:
    return json.dumps([a.to_dict() for a in actions], indent=2)
