"""``wbscale sweep RECIPE --set model.n_layer=2,4,8 --arch crate,gpt2``: a grid of runs.

Every ``--set KEY=V1,V2,…`` with more than one value is an axis of the grid; a single value
applies to every point. The grid is the product of the axes, in the order given (``--arch``
first). Each point is one ordinary run of the recipe with the point's overrides, named after
its values (``crate-L2-d64``) and kept in the sweep folder (``runs/sweeps/<name>/`` unless
``--out``)::

    <sweep>/sweep.json        the grid, the exact command, each point's status and wall time
    <sweep>/<point>/          a normal run folder (recipe.yaml, checkpoints, summary.json, …)

Points run one after another in this process through :func:`wbscale.train.fit.fit` with
``resume="auto"``: rerunning the same command skips finished points and resumes an
interrupted one. A point that fails is recorded and the sweep goes on to the next.

On a SLURM cluster (``--slurm``) the grid is ONE job array
(:func:`wbscale.slurm.submit.submit_array`): task i trains point i, in its own run folder
with its own saved ``recipe.yaml`` and wandb run, read from ``<sweep>/slurm/points.txt`` by
``SLURM_ARRAY_TASK_ID``; ``--max-concurrent N`` is SLURM's ``%N``. Each task follows the
preemption protocol of any job (checkpoint at the signal, ``scontrol requeue`` of that task,
``--resume auto``). Rerunning the command submits only the points that are neither done nor
submitted; ``wbscale sweep status`` shows every point's state from the run registry
(:mod:`wbscale.runs`), and ``wbscale runs resubmit --failed`` heals the ones that died.

Every point is registered in the run registry of the sweep folder (and of the runs folder
above it) before anything runs, so ``wbscale runs`` lists the whole grid from the start.

When an axis changes the data (a ``data.*`` key), every distinct data configuration gets its
own ``data.out_dir`` (prepared data is reused by runs of the same configuration only).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import itertools
import json
import re
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wbscale.config import Recipe, load_recipe, parse_overrides, resolve_recipe_path
from wbscale.errors import UserError
from wbscale.io import atomic_write_json
from wbscale.provenance import report_environment
from wbscale.ranks import say
from wbscale.slurm.site import JobOptions
from wbscale.sweep.axes import (
    check_extra_axes,
    expand_points,
    extra_axes_args,
    has_extra_axes,
    lr_item,
    scoped_item,
)

SWEEP_FILE = "sweep.json"
# Short names for the usual axes, so point names stay readable: crate-L4-d128.
_SHORT = {
    "model.n_layer": "L",
    "model.n_embd": "d",
    "model.n_head": "h",
    "model.block_size": "T",
    "model.ista_expansion": "x",
    "optim.max_lr": "lr",
    "train.max_steps": "steps",
    "train.micro_batch_size": "B",
    "train.seed": "seed",
    "data.vocab_size": "V",
}
_UNSAFE = re.compile(r"[^A-Za-z0-9.+-]+")


def split_values(raw: str) -> list[str]:
    """``"2,4,8"`` -> ``["2", "4", "8"]``; commas inside ``[]``, ``{}`` or quotes do not split."""
    values, depth, quote, current = [], 0, "", []
    for ch in raw:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            values.append("".join(current).strip())
            current = []
            continue
        current.append(ch)
    values.append("".join(current).strip())
    return values


def parse_grid(sets: list[str], arch: str | None = None) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """``--set`` items (and ``--arch``) -> (fixed ``KEY=VALUE`` overrides, axes ``(KEY, values)``)."""
    fixed: list[str] = []
    axes: list[tuple[str, list[str]]] = []
    items = ([f"model.arch={arch}"] if arch else []) + list(sets)
    seen: set[str] = set()
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected KEY=VALUE or KEY=V1,V2,… (e.g. --set model.n_layer=2,4,8)")
        if key in seen:
            raise UserError(f"--set {key} is given twice (use one --set {key}=V1,V2,… for an axis)")
        seen.add(key)
        values = split_values(raw)
        if any(v == "" for v in values):
            raise UserError(f"--set {item!r}: empty value in the list")
        if len(set(values)) != len(values):
            raise UserError(f"--set {item!r}: a value is listed twice")
        parse_overrides([f"{key}={v}" for v in values])  # same syntax checks as a plain --set
        if len(values) == 1:
            fixed.append(f"{key}={values[0]}")
        else:
            axes.append((key, values))
    return fixed, axes


def parse_scoped(sets: list[str], lrs: list[str] | None = None) -> tuple[list[str], list[tuple[str, str, list[str]]]]:
    """``--set`` items and ``--lr`` values -> (plain ``--set`` items, scoped ``(arch, key, values)``).

    ``ARCH:KEY=V1,V2`` applies to the ``model.arch: ARCH`` points only; ``--lr ARCH=V1,V2``
    is ``ARCH:optim.max_lr=V1,V2`` and ``--lr V1,V2`` is ``optim.max_lr=V1,V2``
    (:mod:`wbscale.sweep.axes`).
    """
    plain: list[str] = []
    scoped: list[tuple[str, str, list[str]]] = []
    for item in [*sets, *(lr_item(lr) for lr in lrs or [])]:
        parts = scoped_item(item)
        if parts is None:
            plain.append(item)
            continue
        arch, key, raw = parts
        values = split_values(raw)
        parse_overrides([f"{key}={v}" for v in values])  # same syntax checks as a plain --set
        scoped.append((arch, key, values))
    return plain, scoped


def _axis_label(key: str, value: str) -> str:
    """The part of a point's name an axis value gives: ``lr2e-3``, ``L4``."""
    return f"{_SHORT.get(key, key.rsplit('.', 1)[-1])}{_slug(value)}"


def _slug(text: str) -> str:
    return _UNSAFE.sub("_", text).strip("_") or "x"


@dataclass(frozen=True)
class Point:
    """One run of the grid."""

    name: str
    values: dict[str, str]  # axis key -> raw value
    overrides: list[str]  # every override of this run (fixed + axes + placement)


@dataclass
class SweepSpec:
    """A sweep: the recipe, its fixed overrides, the axes, where it lives."""

    recipe: str
    fixed: list[str] = field(default_factory=list)
    axes: list[tuple[str, list[str]]] = field(default_factory=list)
    name: str | None = None
    out: str | None = None
    seeds: int | None = None  # --seeds N: every point N times, train.seed = base + i, run '<point>-s<i>'
    # --set ARCH:KEY=V1,V2 / --lr ARCH=V1,V2: (arch, key, values), for that architecture's points only
    scoped: list[tuple[str, str, list[str]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.axes and not has_extra_axes(self):
            raise UserError(
                "a sweep needs at least one axis: a --set KEY=V1,V2,… with two or more values "
                "(or --arch crate,gpt2)"
            )
        self.recipe_path = resolve_recipe_path(self.recipe)
        self.name = self.name or self.recipe_path.stem
        if _slug(self.name) != self.name:
            raise UserError(f"--name {self.name!r}: use letters, digits and . + - only")
        self.base: Recipe = load_recipe(self.recipe, self.fixed)
        check_extra_axes(self)

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path(self.base.train.runs_dir) / "sweeps" / str(self.name)

    def points(self) -> list[Point]:
        """Every point of the grid, ``model.arch`` (when an axis) varying slowest."""
        keys = [k for k, _ in self.axes]
        data_keys = [k for k in keys if k.startswith("data.") and k != "data.out_dir"]
        points, names = [], set()
        for combo in itertools.product(*(values for _, values in self.axes)):
            values = dict(zip(keys, combo, strict=True))
            arch = values.get("model.arch", self.base.model.arch)
            parts = [_slug(str(arch))]
            parts += [f"{_SHORT.get(k, k.rsplit('.', 1)[-1])}{_slug(v)}" for k, v in values.items() if k != "model.arch"]
            name = "-".join(parts)
            if name in names:
                name = f"{name}-{len(points)}"
            names.add(name)
            overrides = [*self.fixed, *(f"{k}={v}" for k, v in values.items())]
            if data_keys:
                suffix = "-".join(f"{_SHORT.get(k, k.rsplit('.', 1)[-1])}{_slug(values[k])}" for k in data_keys)
                overrides.append(f"data.out_dir={self.base.data.out_dir}-{suffix}")
            overrides += [f"train.runs_dir={self.out_dir}", f"train.run_name={name}"]
            points.append(Point(name, values, overrides))
        return expand_points(self, points, _axis_label)

    def command(self) -> str:
        """The ``wbscale sweep`` command line that reproduces this sweep."""
        args = ["wbscale", "sweep", self.recipe]
        for key, values in self.axes:
            args += ["--arch", ",".join(values)] if key == "model.arch" else ["--set", f"{key}={','.join(values)}"]
        for item in self.fixed:
            args += ["--set", item]
        args += extra_axes_args(self)
        args += ["--name", str(self.name)]
        if self.out:
            args += ["--out", self.out]
        return shlex.join(args)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "recipe": self.recipe,
            "fixed": list(self.fixed),
            "axes": [[k, list(v)] for k, v in self.axes],
            "seeds": self.seeds,
            "scoped": [[a, k, list(v)] for a, k, v in self.scoped],
            "command": self.command(),
        }


@dataclass
class SweepResult:
    """What ``run_sweep`` did; ``failed`` names the points that raised."""

    out_dir: Path
    points: list[dict[str, Any]]
    failed: list[str] = field(default_factory=list)
    scripts: list[str] = field(default_factory=list)  # dry-run SLURM scripts


def _load_state(spec: SweepSpec, points: list[Point]) -> dict[str, Any]:
    path = spec.out_dir / SWEEP_FILE
    fresh = {
        **spec.to_dict(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "points": [{"name": p.name, "values": p.values, "overrides": p.overrides, "status": "pending"} for p in points],
    }
    if not path.is_file():
        return fresh
    old = json.loads(path.read_text())
    mine = spec.to_dict()
    if [old.get(k) for k in ("fixed", "axes")] != [mine["fixed"], mine["axes"]] or Path(old["recipe"]).stem != Path(spec.recipe).stem:
        raise UserError(
            f"{spec.out_dir} holds another sweep ({old.get('command', '?')}); "
            "give this one its own --name (or --out), or delete that folder"
        )
    by_name = {p["name"]: p for p in old.get("points", [])}
    for p in fresh["points"]:
        prior = by_name.get(p["name"], {})
        for key in ("status", "seconds", "val_loss", "job_id", "array_job", "run_dir", "error"):
            if key in prior:
                p[key] = prior[key]
    fresh["created"] = old.get("created", fresh["created"])
    return fresh


def _progress_bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="sweep", unit="run", disable=not enabled, file=sys.stderr, dynamic_ncols=True)


def run_sweep(
    spec: SweepSpec,
    *,
    slurm: JobOptions | None = None,
    dry_run: bool = False,
    progress: bool | None = None,
    fit_fn: Callable[..., Any] | None = None,
    max_concurrent: int | None = None,
) -> SweepResult:
    """Train (or submit, as one job array) every point of ``spec``; ``sweep.json`` records
    each outcome. ``max_concurrent``: at most this many array tasks at once (``--slurm``)."""
    if max_concurrent is not None and slurm is None:
        raise UserError("--max-concurrent limits the tasks of a SLURM job array: use it with --slurm")
    points = spec.points()
    # Resolve every point before training any: a bad value fails now, not after an hour.
    recipes = []
    for point in points:
        try:
            recipes.append(load_recipe(spec.recipe, point.overrides))
        except UserError as err:
            raise UserError(f"sweep point '{point.name}': {err}") from None
    if dry_run and slurm is None:
        return SweepResult(spec.out_dir, [{"name": p.name, "overrides": p.overrides} for p in points])
    if progress is None:
        progress = sys.stderr.isatty()
    state = _load_state(spec, points)
    path = spec.out_dir / SWEEP_FILE
    if not dry_run:
        spec.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, state)
    result = SweepResult(spec.out_dir, state["points"])
    if not dry_run:
        from wbscale.sweep.array import register_points

        register_points(spec.out_dir, Path(spec.base.train.runs_dir), recipes, spec.recipe, str(spec.name))
    if slurm is not None:
        from wbscale.sweep.array import submit_points

        script = submit_points(
            state["points"], recipes, spec.out_dir, str(spec.name), spec.recipe, slurm, dry_run=dry_run,
            max_concurrent=max_concurrent,
        )
        if script is not None:
            result.scripts.append(script)
        elif not dry_run:
            atomic_write_json(path, state)
        return result

    if fit_fn is None:
        from wbscale.train.fit import fit as fit_fn
    state["environment"] = report_environment()
    atomic_write_json(path, state)
    # Prepare each distinct data configuration up front, so that no point's wall time
    # includes tokenizing the data it shares with the others.
    from wbscale.data.prepare import prepare

    prepared: set[str] = set()
    for recipe in recipes:
        key = json.dumps(dataclasses.asdict(recipe.data), sort_keys=True)
        if key not in prepared:
            prepare(recipe.data, progress=progress, wait=True)  # another sweep may share it
            prepared.add(key)
    bar = _progress_bar(len(points), progress)
    try:
        for point, recipe, record in zip(points, recipes, state["points"], strict=True):
            bar.set_postfix_str(point.name)
            start = time.monotonic()
            try:
                outcome = fit_fn(recipe, resume="auto", progress=False)
            except (KeyboardInterrupt, SystemExit):
                record["status"] = "interrupted"
                atomic_write_json(path, state)
                raise
            except Exception as err:  # one failed point must not lose the others
                record.update(status="failed", error=f"{type(err).__name__}: {err}")
                result.failed.append(point.name)
                say(f"sweep point '{point.name}' failed: {record['error']}")
            else:
                if not getattr(outcome, "already_complete", False):
                    record["seconds"] = round(record.get("seconds", 0.0) + time.monotonic() - start, 1)
                record["status"] = "done"
                record.pop("error", None)
                summary = recipe.run_dir / "summary.json"
                if summary.is_file():
                    record["val_loss"] = json.loads(summary.read_text()).get("val_loss")
            atomic_write_json(path, state)
            bar.update(1)
    finally:
        bar.close()
    return result
