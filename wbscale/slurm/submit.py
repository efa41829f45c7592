"""``wbscale slurm submit``: resolve the recipe, render the job script, sbatch it, remember it.

The resolved recipe is saved as ``<run_dir>/recipe.yaml`` and the job trains exactly that
(``wbscale fit --config <run_dir>/recipe.yaml --resume auto``), so a requeued job, or one
started from another checkout, resumes the same run. The job id goes to
``<run_dir>/slurm_jobs.jsonl`` and the script SLURM runs to ``<run_dir>/slurm/job-<id>.sbatch``.
If sbatch refuses the job, its message is shown and nothing this call created is left.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from wbscale.config import load_recipe, save_recipe
from wbscale.errors import UserError
from wbscale.provenance import code_version
from wbscale.slurm.record import append_event
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
    busy = active_jobs(run_dir)
    if busy:
        listed = ", ".join(f"{j.job_id} ({j.state})" for j in busy)
        raise UserError(
            f"run '{recipe.train.run_name}' already has a job in the queue: {listed}; two jobs must not "
            f"train one run folder. Wait for it, or stop it with: wbscale slurm cancel {run_dir}"
        )

    undo = _Undo()
    try:
        undo.mkdir(run_dir)
        undo.mkdir(spec.slurm_dir)
        undo.replace_file(run_dir / "recipe.yaml")
        save_recipe(recipe, run_dir / "recipe.yaml")
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
        raise UserError(f"sbatch refused the job: {message}")
    job_id = proc.stdout.strip().split(";")[0]
    script_path = spec.slurm_dir / f"job-{job_id}.sbatch"
    script_path.write_text(script)
    append_event(
        run_dir, "submit", job_id=job_id, run_name=spec.run_name, nodes=spec.nodes,
        tasks_per_node=spec.tasks_per_node, gpus_per_node=spec.gpus_per_node, array=spec.array,
        partition=spec.partition, account=spec.account, time_limit=spec.time, signal=spec.signal,
        grace_seconds=spec.grace_seconds, script=str(script_path), workdir=str(workdir), **code_version(),
    )
    return SubmitResult(job_id, run_dir, script, spec, script_path)


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

