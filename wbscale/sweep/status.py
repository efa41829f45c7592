"""``wbscale sweep status NAME_OR_DIR``: the run registry filtered to one sweep.

One row per point of the grid, in grid order, with the state the registry derives
(:mod:`wbscale.runs.state`: pending, running, preempted-requeued, failed, finished, stale);
a point not registered yet shows as pending.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from wbscale.errors import UserError, did_you_mean
from wbscale.sweep.grid import SWEEP_FILE


def resolve_sweep_dir(name_or_dir: str, runs_dir: str | Path = "runs") -> Path:
    """A sweep folder given as a path, or as a sweep name under ``<runs_dir>/sweeps/``."""
    for candidate in (Path(name_or_dir), Path(runs_dir) / "sweeps" / name_or_dir):
        if (candidate / SWEEP_FILE).is_file():
            return candidate
    known = sorted(p.parent.name for p in (Path(runs_dir) / "sweeps").glob(f"*/{SWEEP_FILE}"))
    raise UserError(
        f"no sweep '{name_or_dir}' (no {name_or_dir}/{SWEEP_FILE} and no {runs_dir}/sweeps/{name_or_dir}/{SWEEP_FILE})"
        + did_you_mean(name_or_dir, known) + (f"; sweeps: {', '.join(known)}" if known else "")
    )


def sweep_status(name_or_dir: str, runs_dir: str | Path = "runs") -> tuple[Path, list[Any]]:
    """(the sweep folder, one :class:`~wbscale.runs.state.RunRow` per point, in grid order)."""
    from wbscale.runs.state import list_runs

    sweep_dir = resolve_sweep_dir(name_or_dir, runs_dir)
    state = json.loads((sweep_dir / SWEEP_FILE).read_text())
    names = [p["name"] for p in state.get("points", [])]
    return sweep_dir, list_runs(sweep_dir, only=names)
