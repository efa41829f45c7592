"""The registry on disk: per-run event files, progress snapshots, membership files, index.

Layout (no server, no database; plain files that any number of jobs may write at once)::

    <run_dir>/events/<time_ns>-<event>-<host>-<pid>-<n>.json   one file per event, never rewritten
    <run_dir>/progress.json                                    the trainer's latest step + heartbeat
    <runs_dir>/.registry/runs/<run path>/<host>-<pid>.json     one membership file per run and writer
    <runs_dir>/.registry/index.json                            what the last reader derived (a cache)

Why concurrent writers cannot corrupt or lose anything, on a local disk or a shared
filesystem (NFS, Lustre, GPFS) with many jobs writing at once:

- No file is ever appended to or written in place by two processes. Every event is its own
  file, named by time, host, pid and a per-process counter, so two writers never pick the
  same name; it is written to a private temp name, fsynced and renamed into place (rename
  is atomic on POSIX filesystems and on NFS), so a reader sees a whole event or none.
  (O_APPEND to one shared file is not atomic across NFS clients: lines from two nodes can
  overwrite each other. That is why events are not lines of one file, here and in
  :mod:`wbscale.slurm.record`.)
- ``progress.json`` has a single writer (global rank 0 of the run, which holds the run
  lock) and is replaced by rename: the newest snapshot wins, an older one is worth nothing.
- A run's membership is a folder with one file per writer (``fit``, a sweep, ``slurm
  submit``, a reader that found the folder), named by its host and pid: a writer only ever
  replaces its own file (with everything it knew before, so a later process that reuses a
  pid loses nothing), never another's. Readers merge the files, the earliest registration
  first: a field is the first value any writer recorded, and no writer can drop another's.
  (A membership written by an older version, ``.registry/runs/<run path>.json``, is read
  as one more writer's file.)
- ``index.json`` is derived data, written (by rename) only by readers: losing it, or two
  readers racing to write it, costs nothing. :func:`rebuild` re-creates the whole
  ``.registry`` from the run folders (their ``recipe.yaml``, ``events/``, SLURM job record
  and a sweep folder's ``sweep.json``) when it is lost.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from wbscale.io import SAFE_NAME, read_json_folder, write_unique
from wbscale.slurm.record import EVENTS_DIR as JOB_EVENTS_DIR
from wbscale.slurm.record import JOBS_FILE
from wbscale.slurm.record import read_events as read_job_events

REGISTRY_DIR = ".registry"
MEMBERS_DIR = "runs"
INDEX_FILE = "index.json"
EVENTS_DIR = "events"
PROGRESS_FILE = "progress.json"
# Files a run folder has that tell a run from another folder (sweep folders have sweep.json).
RUN_MARKERS = ("recipe.yaml", EVENTS_DIR, JOBS_FILE, JOB_EVENTS_DIR)
NOT_RUNS = {"checkpoints", "wandb", "slurm", "plots", EVENTS_DIR, JOB_EVENTS_DIR, REGISTRY_DIR, "bimt-pruned"}
SWEEP_FILE = "sweep.json"  # wbscale.sweep.grid.SWEEP_FILE (a sweep folder's record)
SHALLOW_DEPTH = 1  # every read looks for unregistered run folders this deep (cheap)
REBUILD_DEPTH = 3  # runs/sweeps/<name>/<point>
_SEQ = itertools.count()
_REGISTER_LOCK = threading.Lock()  # one writer per membership file, threads included


def host() -> str:
    return socket.gethostname()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None


# ---------------------------------------------------------------------------- events


def write_event(run_dir: Path, event: str, **fields: Any) -> dict[str, Any]:
    """Record one event of a run (its own file under ``<run_dir>/events/``); returns it."""
    now = time.time()
    row = {
        "event": event,
        "time": now,
        "iso": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(now)),
        "host": host(),
        "pid": os.getpid(),
        **fields,
    }
    name = f"{time.time_ns():020d}-{event}-{SAFE_NAME.sub('_', host())}-{os.getpid()}-{next(_SEQ)}.json"
    write_unique(Path(run_dir) / EVENTS_DIR / name, (json.dumps(row, sort_keys=True, default=str) + "\n").encode())
    return row


def read_events(run_dir: Path) -> list[dict[str, Any]]:
    """Every event of a run, oldest first (unreadable or half-written files are skipped)."""
    rows = []
    for _, row in read_json_folder(Path(run_dir) / EVENTS_DIR):
        if isinstance(row.get("event"), str):
            row.setdefault("time", 0.0)
            rows.append(row)
    return sorted(rows, key=lambda r: float(r.get("time") or 0.0))


def write_progress(run_dir: Path, progress: dict[str, Any]) -> None:
    """The trainer's latest progress (one writer: global rank 0). Not fsynced: a lost
    snapshot is replaced by the next one."""
    row = {"time": time.time(), "host": host(), "pid": os.getpid(), **progress}
    write_unique(Path(run_dir) / PROGRESS_FILE, (json.dumps(row, sort_keys=True, default=str) + "\n").encode(), sync=False)


def read_progress(run_dir: Path) -> dict[str, Any]:
    row = _read_json(Path(run_dir) / PROGRESS_FILE)
    return row if isinstance(row, dict) else {}


# ---------------------------------------------------------------------------- membership


def registry_dir(runs_dir: Path) -> Path:
    return Path(runs_dir) / REGISTRY_DIR


def _member_dir(runs_dir: Path, rel: str) -> Path:
    return registry_dir(runs_dir) / MEMBERS_DIR / quote(rel, safe="")


def _legacy_member_path(runs_dir: Path, rel: str) -> Path:
    """Where an older version kept a run's single membership file (read, never written)."""
    return registry_dir(runs_dir) / MEMBERS_DIR / f"{quote(rel, safe='')}.json"


def _writer_file(runs_dir: Path, rel: str) -> Path:
    return _member_dir(runs_dir, rel) / f"{SAFE_NAME.sub('_', host())}-{os.getpid()}.json"


def relative_name(runs_dir: Path, run_dir: Path) -> str:
    """The run's name in a registry: its folder relative to the runs folder (``a`` or
    ``sweeps/grid/crate-L2``)."""
    rel = os.path.relpath(Path(run_dir).resolve(), Path(runs_dir).resolve())
    return Path(rel).as_posix()


def _merge(rel: str, parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One membership from every writer's file: the earliest registration first, and a
    field's first non-empty value wins."""
    parts = sorted(parts, key=lambda r: float(r.get("registered") or 0.0) if isinstance(r.get("registered"), (int, float)) else 0.0)
    row: dict[str, Any] = {"run_dir": rel, "name": Path(rel).name}
    for part in parts:
        for key, value in part.items():
            if key in ("run_dir", "name"):
                continue
            if value is not None and row.get(key) in (None, ""):
                row[key] = value
    return row


def _member_parts(runs_dir: Path, rel: str) -> list[dict[str, Any]] | None:
    """Every writer's membership file of one run (None when the run is not a member)."""
    parts: list[dict[str, Any]] = []
    found = False
    folder = _member_dir(runs_dir, rel)
    try:
        names = sorted(os.listdir(folder))
        found = True
    except OSError:
        names = []
    for name in names:
        if name.startswith(".") or not name.endswith(".json"):
            continue
        row = _read_json(folder / name)
        if isinstance(row, dict):
            parts.append(row)
    legacy = _legacy_member_path(runs_dir, rel)
    if legacy.is_file():
        found = True
        row = _read_json(legacy)
        if isinstance(row, dict):
            parts.append(row)
    return parts if found else None


def register(runs_dir: Path, run_dir: Path, **info: Any) -> dict[str, Any]:
    """Make ``run_dir`` a member of the registry of ``runs_dir`` (idempotent); returns the
    merged membership.

    ``info`` (``recipe``, ``sweep``, …) fills what the membership does not say yet; a value
    already recorded (by any writer) is kept. Nothing is written when nothing is new; what
    is new goes to this writer's own file (see the module doc), so concurrent writers with
    different ``info`` lose nothing.
    """
    rel = relative_name(runs_dir, run_dir)
    with _REGISTER_LOCK:
        parts = _member_parts(runs_dir, rel)
        merged = _merge(rel, parts or [])
        new = {k: v for k, v in info.items() if v is not None and merged.get(k) in (None, "")}
        if parts is not None and not new:
            return merged
        path = _writer_file(runs_dir, rel)
        mine = _read_json(path)
        mine = mine if isinstance(mine, dict) else {}
        row = {"run_dir": rel, "name": Path(rel).name, "registered": mine.get("registered") or time.time(), **mine}
        for key, value in new.items():
            if row.get(key) in (None, ""):
                row[key] = value
        write_unique(path, (json.dumps(row, sort_keys=True, default=str) + "\n").encode())
        return _merge(rel, [*(parts or []), row])


def members(runs_dir: Path) -> dict[str, dict[str, Any]]:
    """``{relative name: membership}`` of every run in the registry of ``runs_dir``."""
    folder = registry_dir(runs_dir) / MEMBERS_DIR
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return {}
    rels = set()
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            is_dir = entry.is_dir()
        except OSError:
            continue
        if is_dir:
            rels.add(unquote(entry.name))
        elif entry.name.endswith(".json"):
            rels.add(unquote(entry.name[: -len(".json")]))
    found = {}
    for rel in sorted(rels):
        parts = _member_parts(runs_dir, rel)
        if parts is None:
            continue  # unregistered meanwhile
        found[rel] = _merge(rel, parts)  # a file torn by hand: the name is enough
    return found


def unregister(runs_dir: Path, rel: str) -> None:
    shutil.rmtree(_member_dir(runs_dir, rel), ignore_errors=True)
    _legacy_member_path(runs_dir, rel).unlink(missing_ok=True)


# ---------------------------------------------------------------------------- scanning


def is_run_folder(path: Path) -> bool:
    """A folder a run trains into (not a sweep folder, nor a ``slurm submit --array`` parent)."""
    if not path.is_dir() or path.name in NOT_RUNS or path.name.startswith("."):
        return False
    if (path / "sweep.json").is_file():
        return False
    if not any((path / m).exists() for m in RUN_MARKERS):
        return False
    return (path / EVENTS_DIR).is_dir() or not _only_array_parent(path)


def _only_array_parent(path: Path) -> bool:
    """``slurm submit --array`` writes the array's record in ``runs/<run>/`` while its tasks
    train ``runs/<run>-<i>/``: such a folder holds no training of its own."""
    if (path / "checkpoints").exists() or (path / "metrics.jsonl").exists():
        return False
    submits = [row for row in read_job_events(path) if row.get("event") == "submit"]
    return bool(submits) and all(s.get("array") and not s.get("points") for s in submits)


def scan(runs_dir: Path, depth: int) -> Iterator[Path]:
    """Run folders under ``runs_dir``, at most ``depth`` levels down (a run folder's own
    sub-folders are not searched)."""
    root = Path(runs_dir)
    if not root.is_dir():
        return
    frontier = [root]
    for _ in range(depth):
        nxt = []
        for folder in frontier:
            try:
                children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
            except OSError:
                continue
            for child in children:
                if child.name in NOT_RUNS:
                    continue
                if is_run_folder(child):
                    yield child
                else:
                    nxt.append(child)
        frontier = nxt


def discover(runs_dir: Path, depth: int = SHALLOW_DEPTH) -> list[str]:
    """Register run folders the registry does not know yet; returns their names."""
    known = members(runs_dir)
    added = []
    for run in scan(runs_dir, depth):
        rel = relative_name(runs_dir, run)
        if rel not in known:
            register(runs_dir, run, **_info_from_folder(run))
            added.append(rel)
    return added


def recipe_ref_from_argv(argv: list[str] | None = None) -> str | None:
    """The RECIPE a ``wbscale fit`` command line names (a recipe name or YAML path)."""
    argv = list(sys.argv if argv is None else argv)
    if "fit" not in argv:
        return None
    args = argv[argv.index("fit") + 1:]
    takes_value = {"--set", "--resume"}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("--config", "--recipe") and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(("--config=", "--recipe=")):
            return arg.split("=", 1)[1]
        if arg in takes_value:
            i += 2
            continue
        if not arg.startswith("-"):
            return arg
        i += 1
    return None


def _info_from_folder(run: Path) -> dict[str, Any]:
    """What a run folder says about where it came from: the recipe and sweep of its submit
    record, else the RECIPE of its first recorded ``wbscale fit`` command line; the sweep
    (and, failing all else, the recipe) of the sweep folder holding it (``sweep.json``)."""
    info: dict[str, Any] = {}
    for row in read_job_events(run):
        if row.get("event") == "submit" and row.get("recipe"):
            info = {"recipe": row["recipe"], "sweep": row.get("sweep")}
            break
    if not info.get("recipe"):
        for row in read_events(run):
            if row["event"] == "start" and isinstance(row.get("argv"), list):
                ref = recipe_ref_from_argv([str(a) for a in row["argv"]])
                if ref:
                    info["recipe"] = ref
                break  # the first start: the command that made the run
    sweep = _read_json(run.parent / SWEEP_FILE)
    if isinstance(sweep, dict) or (run.parent / SWEEP_FILE).is_file():
        sweep = sweep if isinstance(sweep, dict) else {}
        if not info.get("sweep"):
            info["sweep"] = sweep.get("name") or run.parent.name
        if not info.get("recipe") and sweep.get("recipe"):
            info["recipe"] = sweep["recipe"]
    return {k: v for k, v in info.items() if v}


def rebuild(runs_dir: Path, depth: int = REBUILD_DEPTH) -> list[str]:
    """Re-create the registry from the run folders (after it was lost or damaged); drops
    memberships whose folder is gone. Returns every member's name."""
    for rel in list(members(runs_dir)):
        if not (Path(runs_dir) / rel).is_dir():
            unregister(runs_dir, rel)
    discover(runs_dir, depth)
    write_index(runs_dir, {})
    return sorted(members(runs_dir))


# ---------------------------------------------------------------------------- index


def read_index(runs_dir: Path) -> dict[str, Any]:
    data = _read_json(registry_dir(runs_dir) / INDEX_FILE)
    return data if isinstance(data, dict) and isinstance(data.get("runs"), dict) else {"runs": {}}


def write_index(runs_dir: Path, rows: dict[str, dict[str, Any]]) -> bool:
    """Replace the index with what a reader derived; False when the folder is read-only."""
    try:
        write_unique(
            registry_dir(runs_dir) / INDEX_FILE,
            (json.dumps({"updated": time.time(), "runs": rows}, sort_keys=True, default=str) + "\n").encode(),
            sync=False,
        )
    except OSError:
        return False
    return True
