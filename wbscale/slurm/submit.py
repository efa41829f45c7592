"""``wbscale slurm submit``: resolve the recipe, render the job script, sbatch it, remember it.

The resolved recipe is saved as ``<run_dir>/recipe.yaml`` and the job trains exactly that
(``wbscale fit <run_dir>/recipe.yaml --resume auto``), so a requeued job, or one
started from another checkout, resumes the same run. The job id goes to
``<run_dir>/slurm_jobs.jsonl`` and the script SLURM runs to ``<run_dir>/slurm/job-<id>.sbatch``.
If sbatch refuses the job, its message is shown and nothing this call created is left.

:func:`submit_array` submits a sweep as one job array: one task per point, each training
its own run folder (``wbscale sweep run … --slurm``).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from wbscale.config import Recipe, load_recipe, recipe_from_dict, save_recipe
from wbscale.errors import UserError
from wbscale.io import atomic_write_text
from wbscale.provenance import code_version
from wbscale.slurm.record import SLURM_DIR, append_event
from wbscale.slurm.render import JobSpec, job_spec, render
from wbscale.slurm.site import JobOptions, load_site
from wbscale.slurm.status import active_jobs

SBATCH_TIMEOUT = 120.0


@dataclass
class SubmitResult:
    """What ``submit`` did (``job_id`` is None for a dry run)."""

    job_id: str | None
    run_dir: Path
    script: str
    spec: JobSpec
    script_path: Path | None = None


def _refuse_busy(what: str, run_dir: Path) -> None:
    """UserError when ``run_dir`` already has a job in SLURM's queue: two jobs must not train it."""
    busy = active_jobs(run_dir)
    if busy:
        listed = ", ".join(f"{j.job_id} ({j.state})" for j in busy)
        raise UserError(
            f"{what} already has a job in the queue: {listed}; two jobs must not train one run folder. "
            f"Wait for it, or stop it with: wbscale slurm cancel {run_dir}"
        )


def _sbatch(sbatch: str, script: str, workdir: Path, undo: Any, write_files: Any, what: str) -> str:
    """Write the job's files, sbatch the script, return the job id; on any failure undo the files."""
    try:
        write_files()
        proc = subprocess.run(
            [sbatch, "--parsable"], input=script, capture_output=True, text=True, timeout=SBATCH_TIMEOUT,
            cwd=workdir,
        )
    except subprocess.TimeoutExpired:
        undo.rollback()
        raise UserError(f"sbatch did not answer within {SBATCH_TIMEOUT:.0f}s (is slurmctld up? try `sinfo`)") from None
    except BaseException:
        undo.rollback()
        raise
    if proc.returncode != 0:
        undo.rollback()
        message = (proc.stderr or proc.stdout).strip() or f"exit status {proc.returncode}"
        raise UserError(f"sbatch refused the {what}: {message}")
    return proc.stdout.strip().split(";")[0]


def require_tool(name: str) -> str:
    """Absolute path of a SLURM client command, or a UserError saying it is missing."""
    path = shutil.which(name)
    if path is None:
        raise UserError(
            f"'{name}' not found on PATH: this machine is not a SLURM login node (or SLURM's client "
            "commands are not loaded: try `module load slurm`); use --dry-run to see the job script"
        )
    return path


def submit(
    recipe_ref: str,
    overrides: list[str] | None = None,
    options: JobOptions | None = None,
    *,
    dry_run: bool = False,
    workdir: Path | None = None,
) -> SubmitResult:
    """Submit (or, with ``dry_run``, only render) the job that trains a recipe."""
    options = options or JobOptions()
    nodes, gpus_per_node = options.nodes, options.gpus_per_node
    overrides = list(overrides or [])
    if nodes is not None:
        if nodes < 1:
            raise UserError(f"--nodes must be >= 1 (got {nodes})")
        overrides.append(f"distributed.nodes={nodes}")
    if gpus_per_node is not None:
        if gpus_per_node < 0:
            raise UserError(f"--gpus-per-node must be >= 0 (got {gpus_per_node})")
        if gpus_per_node > 0:  # one task per GPU; 0 keeps the recipe's devices (CPU processes)
            overrides += [f"distributed.devices={gpus_per_node}", "distributed.accelerator=gpu"]
    recipe = load_recipe(recipe_ref, overrides)
    site = load_site(options.site_path)
    workdir = (workdir or Path.cwd()).resolve()
    run_dir = (workdir / recipe.run_dir).resolve()
    spec = job_spec(recipe, run_dir / "recipe.yaml", site, options, workdir=workdir)
    script = render(spec)
    if dry_run:
        return SubmitResult(None, run_dir, script, spec)

    sbatch = require_tool("sbatch")
    _refuse_busy(f"run '{recipe.train.run_name}'", run_dir)

    undo = _Undo()

    def write_files() -> None:
        undo.mkdir(run_dir)
        undo.mkdir(spec.slurm_dir)
        undo.replace_file(run_dir / "recipe.yaml")
        save_recipe(recipe, run_dir / "recipe.yaml")

    job_id = _sbatch(sbatch, script, workdir, undo, write_files, "job")
    script_path = spec.slurm_dir / f"job-{job_id}.sbatch"
    script_path.write_text(script)
    append_event(
        run_dir, "submit", job_id=job_id, run_name=spec.run_name, nodes=spec.nodes,
        tasks_per_node=spec.tasks_per_node, gpus_per_node=spec.gpus_per_node, array=spec.array,
        partition=spec.partition, account=spec.account, time_limit=spec.time, signal=spec.signal,
        grace_seconds=spec.grace_seconds, script=str(script_path), workdir=str(workdir),
        recipe=recipe_ref, options=_options_record(options), **code_version(),
    )
    return SubmitResult(job_id, run_dir, script, spec, script_path)


def _options_record(options: JobOptions) -> dict[str, Any]:
    """The command line's job choices, as a resubmission repeats them (nodes and GPUs are
    in the saved recipe already; an array is never repeated)."""
    saved = {k: v for k, v in asdict(options).items() if k not in ("nodes", "gpus_per_node", "array")}
    if saved.get("site_path"):
        saved["site_path"] = str(Path(saved["site_path"]).resolve())
    return saved


# ---------------------------------------------------------------------------- sweep arrays

POINTS_FILE = "points.txt"
# What every task of one array must share: the job's resources and its signal.
_UNIFORM = (
    ("distributed.nodes", lambda r: r.distributed.nodes),
    ("distributed.devices", lambda r: r.distributed.devices),
    ("distributed.accelerator", lambda r: r.distributed.accelerator),
    ("slurm.signal", lambda r: r.slurm.signal),
    ("slurm.grace_seconds", lambda r: r.slurm.grace_seconds),
    ("slurm.requeue", lambda r: r.slurm.requeue),
)


@dataclass
class ArrayResult:
    """What ``submit_array`` did (``job_id`` is None for a dry run)."""

    job_id: str | None
    sweep_dir: Path
    script: str
    spec: JobSpec
    run_dirs: list[Path]  # every point's run folder, in task order
    tasks: list[int]  # the tasks submitted
    script_path: Path | None = None

    def task_id(self, task: int) -> str:
        return f"{self.job_id}_{task}"


def array_spec(tasks: list[int], max_concurrent: int | None = None) -> str:
    """``[0, 1, 2, 5]`` -> ``0-2,5`` (``%N``: at most N tasks at once)."""
    parts, start = [], None
    ordered = sorted(set(tasks))
    for i, task in enumerate(ordered):
        if start is None:
            start = task
        if i + 1 == len(ordered) or ordered[i + 1] != task + 1:
            parts.append(str(start) if start == task else f"{start}-{task}")
            start = None
    return ",".join(parts) + (f"%{max_concurrent}" if max_concurrent else "")


def submit_array(
    recipes: list[Recipe],
    sweep_dir: Path,
    name: str,
    options: JobOptions | None = None,
    *,
    tasks: list[int] | None = None,
    max_concurrent: int | None = None,
    dry_run: bool = False,
    workdir: Path | None = None,
    record: dict[str, Any] | None = None,
) -> ArrayResult:
    """Submit a sweep as ONE job array: task i trains ``recipes[i]`` in its own run folder.

    Each point's resolved recipe is saved as ``<run_dir>/recipe.yaml`` and its folder is
    line i + 1 of ``<sweep_dir>/slurm/points.txt``; the task reads its line by
    ``SLURM_ARRAY_TASK_ID`` and runs ``wbscale fit <run_dir>/recipe.yaml --resume
    auto``, so a requeued task resumes its own point (own checkpoint, own wandb run) under
    the same preemption protocol as any job. ``tasks`` (default: all) are the points to
    submit; ``max_concurrent`` becomes SLURM's ``%N``. The array's submit event goes to
    ``<sweep_dir>/slurm_jobs.jsonl``, and one ``<array>_<i>`` submit event to each
    submitted point's own record, so ``slurm status|cancel POINT`` and ``runs`` see it.
    """
    options = options or JobOptions()
    if options.array:
        raise UserError("--array is for `slurm submit` (a seed sweep of one recipe); a sweep makes its own array")
    if not recipes:
        raise UserError("a job array needs at least one point")
    if max_concurrent is not None and max_concurrent < 1:
        raise UserError(f"--max-concurrent must be >= 1 (got {max_concurrent})")
    tasks = list(range(len(recipes))) if tasks is None else sorted(set(tasks))
    if not tasks or not all(0 <= t < len(recipes) for t in tasks):
        raise UserError(f"array tasks {tasks}: expected indexes 0..{len(recipes) - 1}")
    for key, get in _UNIFORM:
        values = {str(get(r)) for r in recipes}
        if len(values) > 1:
            raise UserError(
                f"the points of one job array must share {key} (the job's resources), but they have "
                f"{', '.join(sorted(values))}; sweep that key in separate sweeps"
            )
    overrides = []
    if options.nodes is not None:
        overrides.append(f"distributed.nodes={options.nodes}")
    if options.gpus_per_node:
        overrides += [f"distributed.devices={options.gpus_per_node}", "distributed.accelerator=gpu"]
    if overrides:
        recipes = [recipe_from_dict(r.to_dict(), overrides) for r in recipes]
    site = load_site(options.site_path)
    workdir = (workdir or Path.cwd()).resolve()
    sweep_dir = (workdir / sweep_dir).resolve()
    run_dirs = [(workdir / r.run_dir).resolve() for r in recipes]
    spec = job_spec(recipes[0], run_dirs[0] / "recipe.yaml", site, options, workdir=workdir)
    spec.run_name, spec.run_dir = name, sweep_dir
    spec.points_file = sweep_dir / SLURM_DIR / POINTS_FILE
    spec.job_name = f"wbscale-{name}"
    spec.array = array_spec(tasks, max_concurrent)
    script = render(spec)
    if dry_run:
        return ArrayResult(None, sweep_dir, script, spec, run_dirs, tasks)

    sbatch = require_tool("sbatch")
    for task in tasks:
        _refuse_busy(f"point '{recipes[task].train.run_name}'", run_dirs[task])
    undo = _Undo()

    def write_files() -> None:
        undo.mkdir(spec.slurm_dir)
        for task in tasks:
            undo.mkdir(run_dirs[task])
            undo.replace_file(run_dirs[task] / "recipe.yaml")
            save_recipe(recipes[task], run_dirs[task] / "recipe.yaml")
        undo.replace_file(spec.points_file)
        atomic_write_text(spec.points_file, "".join(f"{d}\n" for d in run_dirs))

    job_id = _sbatch(sbatch, script, workdir, undo, write_files, "job array")
    script_path = spec.slurm_dir / f"job-{job_id}.sbatch"
    script_path.write_text(script)
    common = dict(
        nodes=spec.nodes, tasks_per_node=spec.tasks_per_node, gpus_per_node=spec.gpus_per_node,
        partition=spec.partition, account=spec.account, time_limit=spec.time, signal=spec.signal,
        grace_seconds=spec.grace_seconds, script=str(script_path), workdir=str(workdir),
        options=_options_record(options), **(record or {}),
    )
    append_event(
        sweep_dir, "submit", job_id=job_id, run_name=name, array=spec.array,
        points=[str(d) for d in run_dirs], **common, **code_version(),
    )
    for task in tasks:
        append_event(
            run_dirs[task], "submit", job_id=f"{job_id}_{task}", run_name=recipes[task].train.run_name,
            array_job=job_id, array_task=task, sweep_dir=str(sweep_dir), **common,
        )
    return ArrayResult(job_id, sweep_dir, script, spec, run_dirs, tasks, script_path)


class _Undo:
    """Remembers what a submission created so a refused one leaves nothing behind."""

    def __init__(self) -> None:
        self.created_dirs: list[list[Path]] = []  # per mkdir call, deepest first
        self.files: list[tuple[Path, bytes | None]] = []

    def mkdir(self, path: Path) -> None:
        missing = []
        for p in [path, *path.parents]:
            if p.exists():
                break
            missing.append(p)
        path.mkdir(parents=True, exist_ok=True)
        self.created_dirs.append(missing)

    def replace_file(self, path: Path) -> None:
        self.files.append((path, path.read_bytes() if path.is_file() else None))

    def rollback(self) -> None:
        for path, old in reversed(self.files):
            if old is None:
                path.unlink(missing_ok=True)
            else:
                path.write_bytes(old)
        for group in reversed(self.created_dirs):
            for d in group:
                if d.is_dir() and not any(d.iterdir()):
                    d.rmdir()
