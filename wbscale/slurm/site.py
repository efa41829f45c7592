"""Site settings: what a cluster needs that a portable recipe must not say.

Read from ``--site FILE`` or else ``$XDG_CONFIG_HOME/wbscale/slurm.yaml``
(``~/.config/wbscale/slurm.yaml``); every key is optional::

    partition: gpu              # sbatch --partition (the --partition flag wins)
    account: my-project         # --account
    qos: normal                 # --qos
    time: "24:00:00"            # --time
    constraint: a100            # --constraint
    cpus_per_task: 8            # --cpus-per-task (also OMP_NUM_THREADS in the job)
    modules: [cuda/12.4, nccl]  # `module load` lines, in order
    env:                        # exported in the job script
      NCCL_SOCKET_IFNAME: ib0
    setup:                      # raw shell lines before the job step (after modules, env)
      - source /shared/venvs/wbscale/bin/activate
    sbatch: ["--exclusive"]     # extra #SBATCH options
    python: /shared/venvs/wbscale/bin/python   # the interpreter the job runs (default: this one)
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from wbscale.errors import UserError, did_you_mean

TIME_FORMAT = re.compile(r"^(\d+-)?\d{1,3}(:\d{2}){0,2}$")  # SLURM's [D-]HH:MM:SS and shorter forms


@dataclass(kw_only=True)
class SbatchOptions:
    """The sbatch options a site file, the command line and a job script all name (``None``:
    not given there). One list: :class:`SiteConfig`, :class:`JobOptions` and
    :class:`wbscale.slurm.render.JobSpec` extend it."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None
    constraint: str | None = None


@dataclass(kw_only=True)
class JobSetup:
    """What a site file adds to every job script, and the script carries: CPUs per task,
    ``module load`` lines, exported variables, raw setup lines, extra ``#SBATCH`` options."""

    cpus_per_task: int | None = None
    modules: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    setup: list[str] = field(default_factory=list)
    sbatch: list[str] = field(default_factory=list)


@dataclass
class SiteConfig(JobSetup, SbatchOptions):
    """Cluster defaults for ``wbscale slurm submit``."""

    python: str | None = None
    path: Path | None = None  # where it was read from (None: built-in defaults)


@dataclass
class JobOptions(SbatchOptions):
    """What the command line chose for a job; ``None`` keeps the site file's or recipe's value.

    One list of SLURM options for ``slurm submit``, ``sweep --slurm`` and the job renderer.
    """

    nodes: int | None = None
    gpus_per_node: int | None = None
    array: str | None = None
    site_path: str | None = None


def default_site_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "wbscale" / "slurm.yaml"


def _strings(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
        raise UserError(f"{where}: expected a list of strings, got {value!r}")
    return [str(v) for v in value]


def load_site(path: str | os.PathLike[str] | None = None) -> SiteConfig:
    """The site file named, else the default one if it exists, else empty defaults."""
    explicit = path is not None
    file = Path(path) if explicit else default_site_path()
    if not file.is_file():
        if explicit:
            raise UserError(f"site file {file} not found (--site FILE: a YAML file, see slurm/README.md)")
        return SiteConfig()
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{file}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise UserError(f"{file}: expected a mapping of keys (partition, account, modules, ...)")
    known = [f.name for f in fields(SiteConfig) if f.name != "path"]
    site = SiteConfig(path=file)
    for key, value in data.items():
        where = f"{file}: {key}"
        if key not in known:
            raise UserError(f"{file}: unknown key '{key}'" + did_you_mean(str(key), known) + f" (known: {', '.join(known)})")
        if value is None:
            continue
        if key in ("modules", "setup", "sbatch"):
            setattr(site, key, _strings(value, where))
        elif key == "env":
            if not isinstance(value, dict):
                raise UserError(f"{where}: expected a mapping NAME: value, got {value!r}")
            for name in value:
                if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(name)):
                    raise UserError(f"{where}: '{name}' is not a valid environment variable name")
            site.env = {str(k): str(v) for k, v in value.items()}
        elif key == "cpus_per_task":
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{where}: expected a positive integer, got {value!r}")
            site.cpus_per_task = value
        else:
            setattr(site, key, str(value))
    if site.time is not None:
        check_time(site.time, f"{file}: time")
    return site


def check_time(value: str, where: str = "--time") -> str:
    if not TIME_FORMAT.match(value):
        raise UserError(f"{where}: {value!r} is not a SLURM time limit (HH:MM:SS, MM:SS, MM or D-HH:MM:SS)")
    return value
