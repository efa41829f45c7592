"""A sweep on SLURM as ONE job array, and every point in the run registry.

``wbscale sweep run RECIPE … --slurm [--max-concurrent N]`` submits the grid with
:func:`wbscale.slurm.submit.submit_array`: task i trains point i in its own run folder
(its own saved ``recipe.yaml``, checkpoints and wandb run), read from
``<sweep>/slurm/points.txt`` by ``SLURM_ARRAY_TASK_ID``; ``%N`` limits how many run at once.
Each task follows the preemption protocol of any job (checkpoint at the signal, ``scontrol
requeue <array>_<i>``, ``--resume auto``). A rerun submits only the points that are
neither done nor submitted; ``wbscale runs resubmit --failed`` heals the ones that died.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from wbscale.config import Recipe
from wbscale.ranks import say
from wbscale.slurm.site import JobOptions


def register_points(out_dir: Path, base_runs_dir: Path, recipes: list[Recipe], recipe_ref: str, sweep: str) -> None:
    """Every point in the registry of the sweep folder, and of the runs folder holding it, so
    ``wbscale runs`` and ``wbscale sweep status`` list the whole grid before anything runs."""
    from wbscale.runs.store import register

    roots = [Path(out_dir)]
    if Path(base_runs_dir).resolve() in Path(out_dir).resolve().parents:
        roots.append(Path(base_runs_dir))
    for recipe in recipes:
        for root in roots:
            register(root, recipe.run_dir, recipe=recipe_ref, sweep=sweep)


def submit_points(
    points: list[dict[str, Any]],
    recipes: list[Recipe],
    out_dir: Path,
    sweep: str,
    recipe_ref: str,
    slurm: JobOptions,
    *,
    dry_run: bool = False,
    max_concurrent: int | None = None,
) -> str | None:
    """Submit the points not yet submitted or done (all of them for a dry run) as one job
    array; updates each point's record (``status``, ``job_id`` = ``<array>_<i>``, ``run_dir``)
    in ``points`` and returns the script for a dry run."""
    from wbscale.slurm.submit import submit_array

    todo = [i for i, record in enumerate(points) if dry_run or record.get("status") not in ("submitted", "done")]
    if not todo:
        say(f"sweep '{sweep}': every point is submitted or done already (see: wbscale sweep status {out_dir})")
        return None
    result = submit_array(
        recipes, Path(out_dir), f"sweep-{sweep}", slurm, tasks=todo, max_concurrent=max_concurrent,
        dry_run=dry_run, record={"recipe": recipe_ref, "sweep": sweep},
    )
    if dry_run:
        return result.script
    for task in todo:
        points[task].update(
            status="submitted", job_id=result.task_id(task), array_job=result.job_id, run_dir=str(result.run_dirs[task]),
        )
    return None
