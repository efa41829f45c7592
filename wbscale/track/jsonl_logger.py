"""``metrics.jsonl``: the local metrics file every run writes, wandb or not.

One JSON object per ``log_metrics`` call, ``{"step": int, "<name>": value, ...}``, one per
line, flushed as it is written, so ``tail -f`` and :func:`read_metrics` see a live run.
Non-finite floats are written as JSON's ``NaN`` / ``Infinity`` extensions (Python's
``json``, pandas and :func:`read_metrics` read them back).

Exactly once: a resumed or requeued run continues from its checkpoint at step s, but the
process that died may have logged past s. ``JSONLLogger(path, resume_step=s)`` drops the
lines with step > s (rewriting the file atomically), and at step s itself the resumed
process writes only keys the file does not hold yet: the checkpoint writer publishes a
checkpoint only after :meth:`JSONLLogger.sync` made every row logged so far durable
(:mod:`wbscale.ckpt.writer`), so what step s logged is in the file already (a callback that
logs "at the current step" on the first micro-batch after the resume, when the trainer's
step is still s, would duplicate it). As a safety net the first line written by a process
also drops any older line with a larger step (a caller that rewinds further).
"""

from __future__ import annotations

import json
import os
from argparse import Namespace
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from lightning.pytorch.loggers.logger import Logger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from wbscale.io import atomic_write_text
from wbscale.ranks import launch_rank

METRICS_FILE = "metrics.jsonl"


def _read_lines(path: Path) -> list[dict[str, Any]]:
    rows = []
    if not path.is_file():
        return rows
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a crash mid-write
            if isinstance(row, dict):
                rows.append(row)
    return rows


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All rows of a metrics file (or of ``<dir>/metrics.jsonl``), in file order."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    return _read_lines(path)


def truncate_jsonl(path: str | os.PathLike[str], max_step: int) -> int:
    """Drop rows with ``step > max_step`` (and torn lines), atomically; return rows dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    raw = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    keep: list[str] = []
    for line in raw:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        step = row.get("step") if isinstance(row, dict) else None
        if isinstance(step, (int, float)) and step > max_step:
            continue
        keep.append(line)
    dropped = len(raw) - len(keep)
    if dropped:
        atomic_write_text(path, "".join(ln + "\n" for ln in keep))
    return dropped


def _jsonable(value: Any) -> Any:
    """A scalar JSON value for ``value``, or ``None`` when it is not a scalar."""
    if hasattr(value, "item") and callable(value.item):
        try:
            if getattr(value, "numel", lambda: 1)() != 1:
                return None
            value = value.item()
        except (ValueError, RuntimeError):
            return None
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value
    return None


class JSONLLogger(Logger):
    """A Lightning logger that appends one JSON line per ``log_metrics`` call (rank 0 only).

    Args:
        path: the metrics file, or a folder to hold ``metrics.jsonl``.
        resume_step: ``None`` for a new run (an existing file is replaced); the step of
            the checkpoint being resumed otherwise (rows with a larger step are dropped).
        rank: this process's global rank (default: :func:`launch_rank`).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        resume_step: int | None = None,
        rank: int | None = None,
    ) -> None:
        super().__init__()
        path = Path(path)
        if path.suffix != ".jsonl":
            path = path / METRICS_FILE
        self._path = path
        self._rank = launch_rank() if rank is None else rank
        self._fh: IO[str] | None = None
        self._first_write = True
        self._resume_step = resume_step
        self._present: set[str] = set()  # keys already in the file at step resume_step
        if self._rank == 0:
            if resume_step is None:
                if path.exists():
                    atomic_write_text(path, "")
            else:
                truncate_jsonl(path, resume_step)
                self._present = {k for row in _read_lines(path) if row.get("step") == resume_step for k in row}

    # -- Logger API
    @property
    def name(self) -> str:
        return "jsonl"

    @property
    def version(self) -> int:
        return 0

    @property
    def save_dir(self) -> str:
        return str(self._path.parent)

    @property
    def path(self) -> Path:
        """The metrics file."""
        return self._path

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        """Nothing: the resolved recipe is saved next to the run (``recipe.yaml``)."""

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        if self._rank != 0:
            return
        row: dict[str, Any] = {}
        if step is not None:
            row["step"] = int(step)
        for key, value in metrics.items():
            if key == "step":
                continue
            v = _jsonable(value)
            if v is not None:
                row[key] = v
        if len(row) <= ("step" in row):
            return
        if self._resume_step is not None and step is not None and int(step) == self._resume_step:
            # the checkpoint's own step: what it logged was made durable before the checkpoint
            # was published; only keys not in the file yet are new (e.g. a BIMT swap of step s,
            # done at the start of step s+1, after a clean stop at s)
            row = {k: v for k, v in row.items() if k == "step" or k not in self._present}
            self._present.update(row)
            if len(row) <= 1:
                return
        if self._first_write and step is not None:
            # safety net: whatever the caller passed as resume_step, never write a step
            # below one already in the file
            truncate_jsonl(self._path, int(step))
        self._first_write = False
        fh = self._open()
        fh.write(json.dumps(row, allow_nan=True) + "\n")
        fh.flush()

    def _open(self) -> IO[str]:
        if self._fh is None or self._fh.closed:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self._path, "a", encoding="utf-8")
        return self._fh

    @rank_zero_only
    def save(self) -> None:
        if self._fh is not None and not self._fh.closed:
            self._fh.flush()

    def sync(self) -> None:
        """Flush and fsync: every row logged so far survives a crash (before a checkpoint
        of this step is published)."""
        if self._rank == 0 and self._fh is not None and not self._fh.closed:
            self._fh.flush()
            os.fsync(self._fh.fileno())

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self._fh is not None and not self._fh.closed:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
        self._fh = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fh"] = None  # file handles do not pickle (ddp_spawn)
        return state


def latest_values(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key`` over rows, the last value per step, sorted by step."""
    by_step: dict[int, float] = {}
    for row in rows:
        if key in row and "step" in row:
            v = row[key]
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                by_step[int(row["step"])] = float(v)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


__all__ = ["JSONLLogger", "read_metrics", "truncate_jsonl", "latest_values", "launch_rank", "METRICS_FILE"]
