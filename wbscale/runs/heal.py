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

A SLURM run (one with a job in ``slurm_jobs.jsonl``) is submitted again with
:func:`wbscale.slurm.submit.submit`, with the partition, account, time limit, QoS,
constraint and site file of its last submission, from the folder it was submitted from.
A local run is started again in the background on this host (``wbscale fit --config
<run>/recipe.yaml --resume auto``, output to ``<run>/resubmit-<n>.log``); one trained on
another host is left to that host. Each resubmission is a ``resubmit`` event of the run
(attempt, budget, the reason it died, the new job id or pid).

``--watch`` repeats this every ``--interval`` seconds (bounded: 1 s to 1 h), for
``--rounds`` rounds (default: until interrupted), e.g. on a login node.
"""

from __future__ import annotations

import json
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
    from wbscale.slurm.submit import submit

    workdir = Path(submit_event.get("workdir") or row.workdir or Path.cwd())
    result = submit(str(run_dir / "recipe.yaml"), [], options_from_submit(submit_event), workdir=workdir)
    if result.run_dir.resolve() != run_dir.resolve():  # cannot happen for a folder submit wrote
        raise UserError(f"{run_dir}/recipe.yaml trains {result.run_dir}, not this folder; resubmit it by hand")
    return str(result.job_id), f"job {result.job_id}"


def _resubmit_local(row: RunRow, run_dir: Path, attempt: int) -> tuple[int, str]:
    starts = [e for e in store.read_events(run_dir) if e["event"] == "start"]
    last = starts[-1] if starts else {}
    if last.get("host") and last["host"] != socket.gethostname():
        raise UserError(f"trained on host {last['host']}: run `wbscale runs resubmit {row.name}` there")
    if last.get("torchrun"):
        raise UserError("launched by torchrun: relaunch it the same way with `--resume auto`")
    cwd = Path(last.get("cwd") or row.workdir or Path.cwd())
    log = run_dir / f"resubmit-{attempt}.log"
    cmd = [sys.executable, "-m", "wbscale.cli", "fit", "--config", str(run_dir / "recipe.yaml"), "--resume", "auto", "--no-progress"]
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
        if dry_run:
            actions.append(Action(row.name, row.state, row.reason, "would-resubmit", f"attempt {attempt} of {max_retries}"))
            continue
        submit_event = _last_submit(run_dir)
        try:
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
    report: Callable[[list[Action]], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> list[Action]:
    """:func:`resubmit` every ``interval`` seconds (clamped to 1 s .. 1 h), ``rounds`` times."""
    if rounds is not None and rounds < 1:
        raise UserError(f"--rounds must be >= 1 (got {rounds})")
    interval = min(MAX_INTERVAL_S, max(MIN_INTERVAL_S, float(interval)))
    done: list[Action] = []
    n = 0
    while rounds is None or n < rounds:
        actions = resubmit(runs_dir, failed=failed, stale=stale, max_retries=max_retries)
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
