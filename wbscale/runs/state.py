"""One row per run, derived from what is on disk and what SLURM says now.

Inputs per run (no run is ever asked anything; a dead one cannot answer):

- ``recipe.yaml`` (arch, shape, ``max_steps``), the registry membership (recipe, sweep);
- the run's events (:mod:`.store`: start / end / fail / resubmit, written by
  :class:`~wbscale.runs.recorder.RunRecorder` and the tools) and ``slurm_jobs.jsonl``
  (submit / start / preempt / cancel, written by :mod:`wbscale.slurm`);
- the tail of ``metrics.jsonl`` (step, tokens, losses, tokens/s), ``checkpoints/last``,
  ``summary.json``, ``wandb_id.txt`` and ``wandb/``;
- liveness: the run lock ``.fit.lock`` (pid on this host, heartbeat from another) and, for
  SLURM runs, one ``scontrol`` call for every job of every run listed.

States (:func:`derive`), the latest attempt of a run deciding:

========================  ==========================================================
pending                   registered or submitted, not started (the job is queued)
running                   its process holds the run lock, or its job is RUNNING
preempted-requeued        stopped at a signal with a checkpoint (or requeued by SLURM
                          after a node failure) and its job is queued again
failed                    ended without finishing: an error, bad input (exit 2), a
                          cancel, a job that ended before training started
finished                  trained to ``max_steps``
stale                     recorded as running, but its process or job is gone without
                          a word (SIGKILL, OOM killer, node failure, time limit
                          without the signal)
========================  ==========================================================
"""

from __future__ import annotations

import fnmatch
import json
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from wbscale.ckpt.format import LAST_FILE, META_FILE, STEP_DIR, checkpoints_dir
from wbscale.errors import UserError, did_you_mean
from wbscale.locks import RUN_LOCK_FILE, pid_alive, read_holder
from wbscale.runs import store
from wbscale.slurm.record import read_events as read_job_events

STATES = ("pending", "running", "preempted-requeued", "failed", "finished", "stale")
WANDB_ID_FILE = "wandb_id.txt"  # wbscale.track.wandb_run.WANDB_ID_FILE (imports Lightning)
STALE_AFTER_S = 600.0  # a lock heartbeat from another host older than this: the holder is gone
METRICS_TAIL_BYTES = 256 * 1024
BAD_INPUT_EXIT = 2
QUEUED = {"PENDING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "SUSPENDED", "STOPPED", "RESV_DEL_HOLD"}
LIVE = {"RUNNING", "CONFIGURING", "COMPLETING", "SIGNALING", "STAGE_OUT", "RESIZING"}
END_TEXT = {
    "finished": "finished",
    "requeued": "stopped at a signal and requeued itself",
    "not-requeued": "stopped at the requeue signal but could not requeue (exit 75)",
    "terminated": "stopped by SIGTERM (cancel or preemption), checkpoint saved",
    "interrupted": "interrupted (Ctrl-C), checkpoint saved",
    "stopped": "stopped early (train.exit_interval)",
    "bad-input": "bad input",
    "oom": "out of GPU memory",
    "error": "error",
}


@dataclass
class RunRow:
    """What ``wbscale runs`` shows of one run (``--json`` prints these fields)."""

    name: str
    run_dir: str
    state: str
    reason: str = ""
    recipe: str | None = None
    sweep: str | None = None
    arch: str | None = None
    size: str | None = None
    step: int | None = None
    max_steps: int | None = None
    tokens: float | None = None
    train_loss: float | None = None
    val_loss: float | None = None
    tokens_per_second: float | None = None
    checkpoint: int | None = None
    checkpoint_path: str | None = None
    jobs: list[str] = field(default_factory=list)
    requeues: int = 0
    retries: int = 0
    bad_input: bool = False
    wandb: str | None = None
    host: str | None = None
    workdir: str | None = None
    updated: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------- reading a folder


def _yaml_load(text: str) -> Any:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(text, Loader=loader)  # noqa: S506 - a safe loader


def recipe_info(run_dir: Path, cache: dict[str, Any] | None = None) -> dict[str, Any]:
    """Arch, shape and max_steps from ``recipe.yaml`` (cached by its mtime in the index)."""
    path = Path(run_dir) / "recipe.yaml"
    try:
        st = path.stat()
    except OSError:
        return {}
    stamp = f"{st.st_mtime_ns}:{st.st_size}"
    if cache and cache.get("recipe_stamp") == stamp and "recipe_info" in cache:
        return dict(cache["recipe_info"])
    try:
        data = _yaml_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return {}
    model, train = data.get("model") or {}, data.get("train") or {}
    info = {
        "arch": model.get("arch"),
        "size": f"{model.get('n_layer')}L-{model.get('n_embd')}d-{model.get('n_head')}h" if model else None,
        "max_steps": train.get("max_steps"),
        "run_name": train.get("run_name"),
        "runs_dir": train.get("runs_dir"),
        "recipe_stamp": stamp,
    }
    return info


def metrics_tail(run_dir: Path) -> dict[str, Any]:
    """The newest step and the newest value of each metric in the tail of ``metrics.jsonl``."""
    path = Path(run_dir) / "metrics.jsonl"
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - METRICS_TAIL_BYTES))
            data = f.read()
    except OSError:
        return {}
    lines = data.split(b"\n")
    if size > METRICS_TAIL_BYTES:
        lines = lines[1:]  # the first line is cut
    latest: dict[str, Any] = {}
    for line in reversed(lines):
        try:
            row = json.loads(line)
        except ValueError:
            continue  # empty, or torn by a crash
        if not isinstance(row, dict):
            continue
        step = row.get("step")
        if isinstance(step, int):
            latest.setdefault("step", step)
            latest["step"] = max(latest["step"], step)
        for key in ("train/loss", "val/loss", "train/tokens_per_second", "train/tokens_seen"):
            if key in row and key not in latest and isinstance(row[key], (int, float)):
                latest[key] = row[key]
    return latest


def last_checkpoint(run_dir: Path) -> tuple[int | None, str | None]:
    """The step and folder that ``checkpoints/last`` names (a complete, published checkpoint)."""
    root = checkpoints_dir(Path(run_dir))
    try:
        name = (root / LAST_FILE).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None, None
    match = STEP_DIR.match(name)
    if not match or not (root / name / META_FILE).is_file():
        return None, None
    return int(match.group(1)), str(root / name)


def _summary(run_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((Path(run_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def wandb_location(run_dir: Path, starts: list[dict[str, Any]]) -> str | None:
    """The wandb run URL when the run was online, else its newest offline folder."""
    for start in reversed(starts):
        wandb = start.get("wandb") or {}
        if wandb.get("url"):
            return str(wandb["url"])
    try:
        rid = (Path(run_dir) / WANDB_ID_FILE).read_text().strip()
    except OSError:
        return None
    folders = sorted((Path(run_dir) / "wandb").glob(f"*run-*-{rid}")) if rid else []
    if folders:
        return _short_path(folders[-1])
    return f"wandb id {rid}" if rid else None


def _short_path(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------------- liveness


def lock_liveness(run_dir: Path, stale_after: float = STALE_AFTER_S) -> tuple[bool | None, str]:
    """Whether the run lock's holder lives: (True/False, how we know); (None, "") without a lock."""
    path = Path(run_dir) / RUN_LOCK_FILE
    holder = read_holder(path)
    if holder is None:
        return (False, "its run lock is gone") if path.exists() else (None, "")
    if holder.pid is None:
        return False, "its run lock names no process"
    if holder.host == socket.gethostname():
        if pid_alive(holder.pid, holder.pid_start):
            return True, f"pid {holder.pid} on {holder.host}"
        return False, f"process {holder.pid} on {holder.host} is gone"
    beats = []
    for text in (holder.heartbeat, holder.started):
        try:
            beats.append(datetime.strptime(text or "", "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp())
        except ValueError:
            pass
    try:
        beats.append(path.stat().st_mtime)
    except OSError:
        pass
    age = time.time() - max(beats) if beats else float("inf")
    if age <= stale_after:
        return True, f"pid {holder.pid} on {holder.host}, heartbeat {age:.0f}s ago"
    return False, f"no heartbeat from pid {holder.pid} on {holder.host} for {age:.0f}s"


# ---------------------------------------------------------------------------- events


def _slurm_time(text: Any) -> float:
    try:
        return datetime.strptime(str(text), "%Y-%m-%dT%H:%M:%S%z").timestamp()
    except ValueError:
        return 0.0


PREEMPT_REASON = {"requeued": "requeued", "not-requeued": "not-requeued"}


def timeline(run_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(registry events, the SLURM record's events with ``time`` as epoch seconds)."""
    events = store.read_events(run_dir)
    jobs = []
    for row in read_job_events(Path(run_dir)):
        jobs.append({**row, "time": _slurm_time(row.get("time")), "source": "slurm"})
    return events, jobs


def _incarnations(events: list[dict], jobs: list[dict]) -> tuple[list[dict], list[dict]]:
    """Starts and ends: the recorder's, or (a run trained without it) the SLURM record's."""
    starts = [e for e in events if e["event"] == "start"]
    ends = [e for e in events if e["event"] == "end"]
    if starts:
        return starts, ends
    starts = [{**e, "event": "start", "synthetic": True} for e in jobs if e.get("event") == "start"]
    for e in jobs:
        if e.get("event") != "preempt":
            continue
        code = e.get("exit_code")
        reason = PREEMPT_REASON.get(e.get("action"), "interrupted" if code == 130 else "terminated")
        ends.append({**e, "event": "end", "reason": reason, "step": e.get("step"), "synthetic": True})
    return starts, ends


def _job_of(row: dict | None) -> str | None:
    value = (row or {}).get("job_id")
    return str(value) if value not in (None, "", "local") else None


def _state_word(job: Any) -> str:
    return str(getattr(job, "state", "UNKNOWN") or "UNKNOWN").split()[0]


def _exit_of(job: Any) -> int | None:
    code = str(getattr(job, "exit_code", "") or "")
    head = code.split(":", 1)[0]
    return int(head) if head.isdigit() else None


def _end_text(end: dict) -> str:
    reason = str(end.get("reason") or "error")
    text = END_TEXT.get(reason, reason)
    if end.get("step") is not None:
        text += f" at step {end['step']}"
    if end.get("message") and reason in ("error", "oom", "bad-input"):
        text += f": {str(end['message'])[:160]}"
    if end.get("exit_code") not in (None, 0):
        text += f" (exit {end['exit_code']})"
    return text


def derive(
    events: list[dict[str, Any]],
    jobs: list[dict[str, Any]],
    snapshot: dict[str, Any],
    *,
    lock: tuple[bool | None, str] = (None, ""),
    checkpoint: int | None = None,
    max_steps: int | None = None,
    stale_after: float = STALE_AFTER_S,
) -> tuple[str, str, bool]:
    """(state, reason, bad_input) of one run; see the module doc for the states."""
    done = checkpoint is not None and max_steps is not None and checkpoint >= max_steps
    starts, ends = _incarnations(events, jobs)
    fails = [e for e in events if e["event"] == "fail"]
    submits = [e for e in jobs if e.get("event") == "submit" and e.get("job_id")]
    submits += [e for e in events if e["event"] == "resubmit"]
    submits.sort(key=lambda e: e["time"])
    start = starts[-1] if starts else None
    submit = submits[-1] if submits else None
    fail = fails[-1] if fails else None
    lock_alive, lock_how = lock

    # The newest attempt has not started training yet (a start belongs to the newest
    # submission when it is later, or names the same job or relaunched pid).
    same = submit is not None and start is not None and (
        (_job_of(submit) is not None and _job_of(submit) == _job_of(start))
        or (submit.get("pid") is not None and _job_of(submit) is None and submit.get("pid") == start.get("pid"))
    )
    if start is None or (submit is not None and submit["time"] > start["time"] and not same):
        if fail is not None and (submit is None or fail["time"] >= submit["time"]):
            return "failed", _end_text({**fail, "reason": fail.get("reason", "bad-input")}), fail.get("exit_code") == BAD_INPUT_EXIT
        if submit is None:
            if done:
                return "finished", "trained to max_steps", False
            if lock_alive:
                return "running", lock_how, False
            if start is None and checkpoint is not None:
                return "failed", f"stopped at step {checkpoint} (no record of why)", False
            return "pending", "registered, not started", False
        job_id = _job_of(submit)
        if job_id is None:  # a local relaunch by `runs resubmit`
            pid = submit.get("pid")
            if lock_alive or (pid and submit.get("host") == socket.gethostname() and pid_alive(int(pid))):
                return "pending", f"relaunched (pid {pid}), starting", False
            return "failed", f"relaunched process {pid} exited before training started (log: {submit.get('log')})", False
        job = snapshot.get(job_id)
        word = _state_word(job)
        if job is None:
            return "pending", f"job {job_id} submitted (SLURM does not say more here)", False
        if word in QUEUED:
            why = f": {job.reason}" if getattr(job, "reason", None) else ""
            return "pending", f"job {job_id} {word.lower()}{why}", False
        if word in LIVE:
            return "running", f"job {job_id} starting", False
        if done:
            return "finished", "trained to max_steps", False
        code = _exit_of(job)
        return ("failed", f"job {job_id} ended {word} before training started"
                + (f" (exit {code})" if code else ""), code == BAD_INPUT_EXIT)

    after = [e for e in ends if e["time"] >= start["time"] - 1e-6]
    end = next((e for e in after if not e.get("rank")), after[0] if after else None)
    job_id = _job_of(start)
    job = snapshot.get(job_id) if job_id else None
    word = _state_word(job) if job is not None else None
    restarted = (
        job is not None and job.requeues is not None and start.get("restart_count") is not None
        and job.requeues > int(start["restart_count"])
    )
    if end is not None:
        reason = str(end.get("reason") or "error")
        if reason == "finished" or done:
            return "finished", "trained to max_steps", False
        if fail is not None and fail["time"] > end["time"]:
            return "failed", _end_text({**fail, "reason": fail.get("reason", "bad-input")}), fail.get("exit_code") == BAD_INPUT_EXIT
        text = _end_text(end)
        if word in QUEUED or (word in LIVE and reason == "requeued" and not restarted):
            return "preempted-requeued", f"{text}; job {job_id} {word.lower()}", False
        if word in LIVE and restarted:
            return "running", f"job {job_id} restarted after: {text}", False
        if word == "CANCELLED":
            text = f"cancelled: {text}"
        elif word is not None and word not in LIVE:
            text += f"; job {job_id} {word}"
        elif job_id is None and reason == "requeued":
            text = "stopped at the requeue signal outside SLURM; resume with --resume auto"
        code = end.get("exit_code")
        return "failed", text, code == BAD_INPUT_EXIT or reason == "bad-input"

    # Started and said nothing since: is it still there?
    if word in LIVE:
        return "running", f"job {job_id}" + (" (restarted)" if restarted else ""), False
    if word in QUEUED:
        return "preempted-requeued", f"job {job_id} was requeued by SLURM (node failure or preemption) and is {word.lower()}", False
    if done:
        return "finished", "trained to max_steps", False
    if word is not None:  # SLURM knows the job, and it has ended
        code = _exit_of(job)
        return "stale", f"job {job_id} ended {word}" + (f" (exit {code})" if code else "") + " without a word from the run", code == BAD_INPUT_EXIT
    if lock_alive:
        return "running", lock_how, False
    if lock_alive is False:
        return "stale", lock_how, False
    where = f"pid {start.get('pid')} on {start.get('host')}"
    if start.get("host") == socket.gethostname() and start.get("pid") and pid_alive(int(start["pid"])):
        return "running", where, False
    return "stale", f"{where} is gone (no run lock) without a word from the run", False


# ---------------------------------------------------------------------------- rows


def _requeues(starts: list[dict], job_ids: list[str], snapshot: dict[str, Any]) -> int:
    total = 0
    for job_id in job_ids:
        job = snapshot.get(job_id)
        if job is not None and job.requeues is not None:
            total += job.requeues
        else:
            total += max(0, sum(1 for s in starts if _job_of(s) == job_id) - 1)
    return total


def _job_ids(events: list[dict], jobs: list[dict]) -> list[str]:
    ids: list[str] = []
    for row in [*jobs, *events]:
        job_id = _job_of(row) if row.get("event") in ("submit", "start", "resubmit", "preempt") else None
        if job_id and job_id not in ids:
            ids.append(job_id)
    return ids


def build_row(
    name: str, run_dir: Path, member: dict[str, Any], snapshot: dict[str, Any], cache: dict[str, Any] | None = None,
    stale_after: float = STALE_AFTER_S, loaded: tuple[list, list] | None = None,
) -> RunRow:
    events, jobs = loaded if loaded is not None else timeline(run_dir)
    info = recipe_info(run_dir, cache)
    tail = metrics_tail(run_dir)
    progress = store.read_progress(run_dir)
    ckpt, ckpt_path = last_checkpoint(run_dir)
    summary = _summary(run_dir)
    max_steps = info.get("max_steps") if isinstance(info.get("max_steps"), int) else None
    state, reason, bad = derive(
        events, jobs, snapshot, lock=lock_liveness(run_dir, stale_after), checkpoint=ckpt, max_steps=max_steps,
        stale_after=stale_after,
    )
    starts, _ = _incarnations(events, jobs)
    job_ids = _job_ids(events, jobs)
    steps = [s for s in (tail.get("step"), progress.get("step"), ckpt, summary.get("step")) if isinstance(s, int)]
    val = tail.get("val/loss", summary.get("val_loss"))
    workdir = next((str(e["workdir"]) for e in reversed(jobs) if e.get("workdir")), None)
    workdir = workdir or next((str(e["cwd"]) for e in reversed(starts) if e.get("cwd")), None)
    recipe = member.get("recipe")
    if recipe and Path(str(recipe)).name == "recipe.yaml":
        recipe = None  # a job trains its saved copy: say nothing rather than the copy's path
    stamps = [e["time"] for e in events] + [progress.get("time") or 0.0]
    return RunRow(
        name=name,
        run_dir=str(Path(run_dir).resolve()),
        state=state,
        reason=reason,
        recipe=recipe,
        sweep=member.get("sweep"),
        arch=info.get("arch"),
        size=info.get("size"),
        step=max(steps) if steps else None,
        max_steps=max_steps,
        tokens=tail.get("train/tokens_seen"),
        train_loss=tail.get("train/loss"),
        val_loss=val if isinstance(val, (int, float)) else None,
        tokens_per_second=tail.get("train/tokens_per_second"),
        checkpoint=ckpt,
        checkpoint_path=ckpt_path,
        jobs=job_ids,
        requeues=_requeues(starts, job_ids, snapshot),
        retries=sum(1 for e in events if e["event"] == "resubmit"),
        bad_input=bad,
        wandb=wandb_location(run_dir, starts),
        host=(starts[-1].get("host") if starts else None),
        workdir=workdir,
        updated=max(stamps) if stamps else None,
    )


def list_runs(
    runs_dir: str | Path = "runs", *, rebuild: bool = False, stale_after: float = STALE_AFTER_S,
    only: list[str] | None = None,
) -> list[RunRow]:
    """Every run of the registry of ``runs_dir``, one row each (and the index refreshed).

    A missing or empty registry is rebuilt from the run folders; every call also registers
    run folders directly under ``runs_dir`` that it does not know yet (``slurm submit``'s
    queued runs, runs from before the registry). ``only``: these names, in this order.
    """
    from wbscale.slurm.status import job_snapshot

    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []  # nothing trained here yet: create nothing
    if rebuild or not (store.registry_dir(runs_dir) / store.MEMBERS_DIR).is_dir():
        store.rebuild(runs_dir)
    else:
        store.discover(runs_dir)
    found = store.members(runs_dir)
    names = list(only) if only is not None else sorted(found)
    loaded = {n: timeline(runs_dir / n) for n in names}
    snapshot = job_snapshot(j for n in names for j in _job_ids(*loaded[n]))
    index = store.read_index(runs_dir)["runs"]
    rows = []
    for name in names:
        member = found.get(name, {"run_dir": name, "name": Path(name).name})
        rows.append(build_row(name, runs_dir / name, member, snapshot, index.get(name), stale_after, loaded[name]))
    fresh = dict(index)
    for row in rows:
        info = recipe_info(runs_dir / row.name, index.get(row.name))
        fresh[row.name] = {**row.to_dict(), "recipe_stamp": info.get("recipe_stamp"), "recipe_info": info}
    store.write_index(runs_dir, {k: v for k, v in fresh.items() if k in found})
    return rows


def find_run(runs_dir: str | Path, name: str) -> str:
    """A run's registry name from its name, its relative path, or its folder."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise UserError(f"no runs folder {runs_dir}/ (--runs-dir DIR: the folder train.runs_dir names)")
    known = store.members(runs_dir) or {n: {} for n in store.rebuild(runs_dir)}
    if name in known:
        return name
    path = Path(name)
    if path.is_dir():
        try:
            rel = store.relative_name(runs_dir, path)
        except ValueError:
            rel = ""
        if rel in known:
            return rel
        if store.is_run_folder(path) and not rel.startswith(".."):
            store.register(runs_dir, path)
            return rel
    by_leaf = [n for n in known if Path(n).name == name]
    if len(by_leaf) == 1:
        return by_leaf[0]
    if len(by_leaf) > 1:
        raise UserError(f"'{name}' names {len(by_leaf)} runs under {runs_dir}: {', '.join(by_leaf)}; give the path")
    store.discover(runs_dir, store.REBUILD_DEPTH)
    known = store.members(runs_dir)
    if name in known:
        return name
    raise UserError(
        f"no run '{name}' under {runs_dir}/" + did_you_mean(name, [Path(n).name for n in known] + list(known))
        + ("" if known else " (no runs recorded there; see `wbscale runs --runs-dir DIR`)")
    )


# ---------------------------------------------------------------------------- filters


def parse_filters(items: list[str]) -> list[tuple[str, list[str]]]:
    """``--filter KEY=GLOB[,GLOB…]``: a row must match every filter, any glob of each."""
    keys = [f for f in RunRow.__dataclass_fields__]
    filters = []
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"--filter {item!r}: expected KEY=VALUE, e.g. state=failed,stale or arch=crate")
        if key not in keys:
            raise UserError(f"--filter {key}: unknown field" + did_you_mean(key, keys) + f" (fields: {', '.join(keys)})")
        if key == "state":
            for state in value.split(","):
                if not any(fnmatch.fnmatchcase(s, state) for s in STATES):
                    raise UserError(f"--filter state={state}: not a state" + did_you_mean(state, STATES) + f" ({', '.join(STATES)})")
        filters.append((key, [v.strip() for v in value.split(",")]))
    return filters


def matches(row: RunRow, filters: list[tuple[str, list[str]]]) -> bool:
    for key, globs in filters:
        value = getattr(row, key)
        values = [str(v) for v in value] if isinstance(value, list) else ["" if value is None else str(value)]
        if not any(fnmatch.fnmatchcase(v, g) for v in values for g in globs):
            return False
    return True


# ---------------------------------------------------------------------------- formatting


def _count(value: float | None) -> str:
    if value is None:
        return "-"
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.0f}"


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


TABLE_HEADER = ("NAME", "RECIPE", "MODEL", "STATE", "STEP", "TOKENS", "TRAIN", "VAL", "TOK/S", "CKPT", "JOBS", "RQ", "WANDB", "REASON")


def table_cells(row: RunRow) -> tuple[str, ...]:
    model = " ".join(x for x in (row.arch, row.size) if x) or "-"
    step = "-" if row.step is None else f"{row.step}/{row.max_steps if row.max_steps is not None else '?'}"
    reason = "" if row.state in ("finished", "running") else row.reason
    return (
        row.name, row.recipe or "-", model, row.state, step, _count(row.tokens), _loss(row.train_loss),
        _loss(row.val_loss), _count(row.tokens_per_second), "-" if row.checkpoint is None else str(row.checkpoint),
        ",".join(row.jobs) or "-", str(row.requeues), row.wandb or "-", reason[:70],
    )


def format_table(rows: list[RunRow]) -> str:
    if not rows:
        return "no runs (every `wbscale fit`, `slurm submit` and `sweep run` records its runs under train.runs_dir)"
    cells = [TABLE_HEADER] + [table_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(TABLE_HEADER))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in cells]
    counts = {s: sum(1 for r in rows if r.state == s) for s in STATES}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items() if n) + f" ({len(rows)} runs)")
    return "\n".join(lines)


def history(run_dir: Path) -> list[dict[str, Any]]:
    """The run's events in time order: the registry's and the SLURM record's, merged (a
    SLURM start or preempt is shown only when the recorder did not record that run)."""
    events, jobs = timeline(run_dir)
    recorded = any(e["event"] == "start" for e in events)
    merged = list(events)
    for row in jobs:
        if row.get("event") in ("start", "preempt") and recorded:
            continue
        merged.append({**row, "event": f"slurm-{row.get('event')}"})
    return sorted(merged, key=lambda e: float(e.get("time") or 0.0))


def describe_event(e: dict[str, Any]) -> str:
    kind = e.get("event")
    job = f"job {e['job_id']}" if e.get("job_id") not in (None, "", "local") else None
    where = f"pid {e.get('pid')} on {e.get('host')}"
    if kind == "start":
        topo = f"world size {e.get('world_size')}, {e.get('strategy') or '?'}"
        if e.get("zero_stage") is not None:
            topo += f" ZeRO-{e['zero_stage']}"
        resumed = f"resumed from step {e['resumed_from']}" if e.get("resumed_from") else "fresh start"
        restart = f" restart {e['restart_count']}" if e.get("restart_count") else ""
        return ", ".join(x for x in (f"{job}{restart}" if job else None, where, topo, resumed) if x)
    if kind == "end":
        rank = f"rank {e['rank']}: " if e.get("rank") else ""
        return rank + _end_text(e)
    if kind == "fail":
        return _end_text({**e, "reason": e.get("reason", "bad-input")}) + (f" [{e.get('phase')}]" if e.get("phase") else "")
    if kind == "resubmit":
        via = job or f"pid {e.get('pid')} (log {e.get('log')})"
        return f"{via}, attempt {e.get('attempt')} of {e.get('budget')}; after: {e.get('after') or '?'}"
    if kind == "slurm-submit":
        extra = f" (array {e['array']})" if e.get("array") else ""
        return f"{job}{extra}" + (f", sweep {e['sweep']}" if e.get("sweep") else "")
    if kind == "slurm-start":
        return f"{job} restart {e.get('restart_count', 0)} on {e.get('nodes')}"
    if kind == "slurm-preempt":
        return f"{job}: {e.get('signal')} at step {e.get('step')}, {e.get('action')} (exit {e.get('exit_code')})"
    if kind == "slurm-cancel":
        return "scancel " + ", ".join(e.get("job_ids") or [])
    return json.dumps({k: v for k, v in e.items() if k not in ("event", "time", "iso")}, default=str)[:200]


def format_show(row: RunRow, events: list[dict[str, Any]]) -> str:
    lines = [f"run {row.name} ({row.run_dir})"]
    for key, value in row.to_dict().items():
        if key in ("name", "run_dir") or value in (None, [], ""):
            continue
        if isinstance(value, list):
            value = ", ".join(value)
        elif isinstance(value, float):
            value = f"{value:.4g}" if key != "updated" else time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(value))
        lines.append(f"  {key:18s} {value}")
    lines.append("history:")
    for e in events:
        stamp = e.get("iso") or time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(float(e.get("time") or 0)))
        lines.append(f"  {stamp}  {str(e.get('event')):14s} {describe_event(e)}")
    if not events:
        lines.append("  (no events recorded)")
    return "\n".join(lines)
