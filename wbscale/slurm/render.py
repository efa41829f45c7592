"""sbatch scripts from the templates in ``slurm/``: ``{{name}}`` placeholders, nothing more.

:func:`job_spec` turns a recipe + site settings + command-line choices into a
:class:`JobSpec`; :func:`render` fills the single-node or the multi-node template with it.
A sweep's job array (``points_file`` set) renders the same templates: each task reads its
run folder from the points file and trains that folder's ``recipe.yaml``.
A placeholder without a value is an error, so a template and this code cannot drift apart
silently.
"""

from __future__ import annotations

import importlib.resources
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from wbscale.config import Recipe
from wbscale.errors import UserError
from wbscale.slurm.record import SLURM_DIR
from wbscale.slurm.site import JobOptions, JobSetup, SbatchOptions, SiteConfig, check_time

# slurm/ in a checkout, wbscale/sbatch/ in an installed wheel
TEMPLATES_DIR = Path(str(importlib.resources.files("wbscale.sbatch")))
SINGLE_NODE = "single_node.sbatch"
MULTI_NODE = "multi_node.sbatch"
PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
ARRAY_SPEC = re.compile(r"^[0-9,\-:%]+$")


@dataclass
class JobSpec(JobSetup, SbatchOptions):
    """Everything that goes into one job script."""

    run_name: str
    run_dir: Path  # absolute
    workdir: Path  # absolute; the job's cwd, so the recipe's relative paths mean the same
    recipe_path: Path  # absolute; the resolved recipe the job trains
    nodes: int
    tasks_per_node: int
    gpus_per_node: int
    signal: str
    grace_seconds: int
    requeue: bool
    python: str
    seed: int
    array: str | None = None
    # A sweep's job array: task i trains the run folder on line i + 1 of this file (its
    # own saved recipe.yaml); run_dir is then the sweep folder (script copy, logs).
    points_file: Path | None = None
    job_name: str | None = None

    @property
    def slurm_dir(self) -> Path:
        return self.run_dir / SLURM_DIR

    @property
    def template(self) -> str:
        return SINGLE_NODE if self.nodes == 1 else MULTI_NODE

    def directives(self) -> list[str]:
        """The optional ``#SBATCH`` lines (the fixed ones are in the template)."""
        opts: list[str] = []
        if self.gpus_per_node > 0:
            opts.append(f"--gpus-per-node={self.gpus_per_node}")
        if self.cpus_per_task:
            opts.append(f"--cpus-per-task={self.cpus_per_task}")
        for name in ("partition", "account", "time", "qos", "constraint", "array"):
            value = getattr(self, name)
            if value:
                opts.append(f"--{name}={value}")
        opts.extend(self.sbatch)
        return [f"#SBATCH {o}" for o in opts]


def job_spec(
    recipe: Recipe,
    recipe_path: Path,
    site: SiteConfig,
    options: JobOptions | None = None,
    *,
    workdir: Path | None = None,
) -> JobSpec:
    """Command-line choices win over the site file; the recipe gives nodes and tasks."""
    options = options or JobOptions()
    gpus_per_node, array, time = options.gpus_per_node, options.array, options.time
    if not re.fullmatch(r"[A-Za-z0-9._+-]+", recipe.train.run_name):
        raise UserError(
            f"train.run_name {recipe.train.run_name!r}: on SLURM use letters, digits and . _ + - only "
            "(it names the job and its log files)"
        )
    workdir = (workdir or Path.cwd()).resolve()
    run_dir = (workdir / recipe.run_dir).resolve()
    for what, path in (("working directory", workdir), ("run folder", run_dir)):
        if re.search(r"\s", str(path)):
            raise UserError(f"the {what} {path} has whitespace in it, which #SBATCH lines cannot hold; use another folder")
    dist = recipe.distributed
    if gpus_per_node is None:
        gpus_per_node = dist.devices if dist.accelerator == "gpu" else 0
    if array is not None and not ARRAY_SPEC.match(array):
        raise UserError(f"--array {array!r}: expected SLURM's index list, e.g. 0-3, 1,5,9 or 0-15%4")
    time = time or site.time
    if time is not None:
        check_time(time)
    return JobSpec(
        run_name=recipe.train.run_name,
        run_dir=run_dir,
        workdir=workdir,
        recipe_path=Path(recipe_path).resolve(),
        nodes=dist.nodes,
        tasks_per_node=dist.devices,
        gpus_per_node=gpus_per_node,
        signal=recipe.slurm.signal,
        grace_seconds=recipe.slurm.grace_seconds,
        requeue=recipe.slurm.requeue,
        python=site.python or sys.executable,
        seed=recipe.train.seed,
        partition=options.partition or site.partition,
        account=options.account or site.account,
        time=time,
        qos=options.qos or site.qos,
        constraint=options.constraint or site.constraint,
        array=array,
        cpus_per_task=site.cpus_per_task,
        modules=list(site.modules),
        env=dict(site.env),
        setup=list(site.setup),
        sbatch=list(site.sbatch),
    )


def _setup_lines(spec: JobSpec) -> str:
    lines = []
    if spec.modules:
        lines.append("module load " + " ".join(shlex.quote(m) for m in spec.modules))
    lines += [f"export {name}={shlex.quote(value)}" for name, value in spec.env.items()]
    lines += spec.setup
    return "\n".join(lines) if lines else "# (no site setup: modules, env and setup lines come from the site file)"


TASK_RUN_DIR = "WBSCALE_TASK_RUN_DIR"


def _task_setup(spec: JobSpec) -> str:
    """A sweep array's task: the run folder of point SLURM_ARRAY_TASK_ID, from the points file."""
    if spec.points_file is None:
        return ""
    points = shlex.quote(str(spec.points_file))
    return (
        "# One sweep point per array task: task i trains the run folder on line i + 1 of the\n"
        "# points file (its saved recipe.yaml), so a requeued task resumes its own point.\n"
        f'{TASK_RUN_DIR}=$(sed -n "$(( SLURM_ARRAY_TASK_ID + 1 ))p" {points})\n'
        f'if [ -z "${TASK_RUN_DIR}" ]; then echo "wbscale: no point $SLURM_ARRAY_TASK_ID in {points}" >&2; exit 2; fi\n'
        f"export {TASK_RUN_DIR}\n"
    )


def _fit_args(spec: JobSpec) -> str:
    if not spec.array or spec.points_file is not None:
        return ""
    # An array is a seed sweep of one recipe: task i trains run '<run>-i' with seed + i.
    return (
        f" \\\n    --set train.run_name={spec.run_name}-${{SLURM_ARRAY_TASK_ID}}"
        f" --set train.seed=$(( {spec.seed} + SLURM_ARRAY_TASK_ID ))"
    )


def render(spec: JobSpec, template: str | None = None) -> str:
    """The job script for ``spec`` (from ``slurm/<template>``)."""
    path = TEMPLATES_DIR / (template or spec.template)
    text = path.read_text()
    task_run = spec.points_file is not None
    values = {
        "job_name": spec.job_name or f"wbscale-{spec.run_name}",
        "run_name": spec.run_name,
        "run_dir": f'"${TASK_RUN_DIR}"' if task_run else shlex.quote(str(spec.run_dir)),
        "slurm_dir": str(spec.slurm_dir),
        "workdir": str(spec.workdir),
        "recipe_path": f'"${TASK_RUN_DIR}/recipe.yaml"' if task_run else shlex.quote(str(spec.recipe_path)),
        "task_setup": _task_setup(spec),
        "nodes": str(spec.nodes),
        "tasks_per_node": str(spec.tasks_per_node),
        "signal": spec.signal,
        "grace_seconds": str(spec.grace_seconds),
        "requeue": "requeue" if spec.requeue else "no-requeue",
        "log_name": "job-%A_%a" if spec.array else "job-%j",
        "extra_directives": "\n".join(spec.directives()) or "# (no partition/account/time given: the cluster's defaults)",
        "setup": _setup_lines(spec),
        "python": shlex.quote(spec.python),
        "fit_args": _fit_args(spec),
    }
    missing = set(PLACEHOLDER.findall(text)) - values.keys()
    if missing:  # a template edited without this code: a bug, not a user error
        raise RuntimeError(f"{path}: placeholders without values: {sorted(missing)}")
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], text)
