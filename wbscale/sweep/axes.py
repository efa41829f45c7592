"""Seeds and per-architecture axes of a sweep, and the learning-rate rule.

``wbscale sweep run`` (:mod:`wbscale.sweep.grid`) expands its grid, then this module:

- ``--seeds N`` repeats every point N times: ``train.seed`` = the recipe's seed + i, the run
  named ``<point>-s<i>`` (``crate-lr2e-3-s0`` … ``-s2``). A rerun with a larger N adds the
  missing seeds to the same sweep folder.
- ``--set ARCH:KEY=V1,V2,…`` is an axis (one value: a setting) for the points of that
  architecture only; ``--lr ARCH=V1,V2,…`` is ``--set ARCH:optim.max_lr=V1,V2,…`` (so CRATE
  and GPT-2 each get their own learning-rate grid), ``--lr V1,V2,…`` is
  ``--set optim.max_lr=V1,V2,…``.
- The learning-rate rule: wherever the sweep sets ``optim.max_lr`` (an axis, a scoped axis
  or a fixed ``--set``) and does not set ``optim.min_lr``, a point's ``optim.min_lr`` is its
  ``optim.max_lr / 10`` (the shipped recipes' ratio and nanoGPT's), so the cosine ends at
  the same fraction of its peak for every learning rate. Set ``optim.min_lr`` to opt out.

It imports nothing from :mod:`.grid`: the grid passes its points and its naming in.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

from wbscale.errors import UserError

__all__ = [
    "LR_KEY",
    "MIN_LR_DIVISOR",
    "MIN_LR_KEY",
    "SEED_KEY",
    "check_extra_axes",
    "expand_points",
    "extra_axes_args",
    "has_extra_axes",
    "scoped_item",
]

LR_KEY, MIN_LR_KEY, SEED_KEY = "optim.max_lr", "optim.min_lr", "train.seed"
MIN_LR_DIVISOR = 10


def scoped_item(item: str) -> tuple[str, str, str] | None:
    """``"crate:optim.max_lr=1e-3,2e-3"`` -> ``("crate", "optim.max_lr", "1e-3,2e-3")``;
    None for a plain ``KEY=VALUE``."""
    key, sep, raw = item.partition("=")
    if ":" not in key:
        return None
    arch, _, key = (part.strip() for part in key.partition(":"))
    if not arch or not key or not sep:
        raise UserError(f"--set {item!r}: expected ARCH:KEY=V1,V2,… (e.g. --set crate:optim.max_lr=1e-3,2e-3)")
    return arch, key, raw


def lr_item(lr: str) -> str:
    """``--lr crate=1e-3,2e-3`` -> ``crate:optim.max_lr=1e-3,2e-3``; ``--lr 1e-3,2e-3`` -> ``optim.max_lr=…``."""
    arch, sep, values = lr.partition("=")
    if not sep:
        return f"{LR_KEY}={lr}"
    if not arch.strip():
        raise UserError(f"--lr {lr!r}: expected ARCH=V1,V2,… (e.g. --lr crate=1e-3,2e-3) or V1,V2,…")
    return f"{arch.strip()}:{LR_KEY}={values}"


def has_extra_axes(spec: Any) -> bool:
    """Whether ``--seeds`` or a scoped ``--set`` makes more than one run out of a point."""
    return (spec.seeds or 0) > 1 or any(len(values) > 1 for _, _, values in spec.scoped)


def _keys(spec: Any) -> set[str]:
    return {k for k, _ in spec.axes} | {item.partition("=")[0].strip() for item in spec.fixed}


def check_extra_axes(spec: Any) -> None:
    """Refuse seeds and scoped settings that contradict the rest of the sweep."""
    keys = _keys(spec)
    if spec.seeds is not None:
        if spec.seeds < 1:
            raise UserError(f"--seeds {spec.seeds}: give 1 or more")
        if SEED_KEY in keys:
            raise UserError(f"--seeds and --set {SEED_KEY} both set the seed: use one of them")
    archs = dict(spec.axes).get("model.arch", [spec.base.model.arch])
    seen: set[tuple[str, str]] = set()
    for arch, key, values in spec.scoped:
        if arch not in archs:
            raise UserError(
                f"--set {arch}:{key} (or --lr {arch}=…): this sweep has no {arch} points "
                f"(model.arch: {', '.join(archs)}); add it with --arch"
            )
        if (arch, key) in seen:
            raise UserError(f"--set {arch}:{key} is given twice (use one --set {arch}:{key}=V1,V2,…)")
        seen.add((arch, key))
        if key in keys:
            raise UserError(f"--set {arch}:{key} and --set {key} both set {key}: use one of them")
        if key == "model.arch" or key.startswith("data."):
            raise UserError(f"--set {arch}:{key}: model.arch and data.* cannot be set per architecture")
        if key == SEED_KEY and spec.seeds is not None:
            raise UserError(f"--seeds and --set {arch}:{SEED_KEY} both set the seed: use one of them")
        if any(v == "" for v in values) or len(set(values)) != len(values):
            raise UserError(f"--set {arch}:{key}={','.join(values)}: an empty or repeated value in the list")


def expand_points(spec: Any, points: list[Any], label: Callable[[str, str], str]) -> list[Any]:
    """The grid's points with the scoped axes, the seeds and the learning-rate rule applied.

    ``label(key, value)`` is the grid's name part of an axis value (``lr2e-3``). Points are
    dataclasses with ``name``, ``values`` and ``overrides`` (the last one ``train.run_name=``).
    """
    if not spec.scoped and spec.seeds is None and LR_KEY not in _keys(spec):
        return points
    base_seed = spec.base.train.seed
    out: list[Any] = []
    names = {p.name for p in points}
    for point in points:
        arch = point.values.get("model.arch", spec.base.model.arch)
        mine = [(k, v) for a, k, v in spec.scoped if a == arch]
        settings = [f"{k}={v[0]}" for k, v in mine if len(v) == 1]
        axes = [(k, v) for k, v in mine if len(v) > 1]
        head = [o for o in point.overrides if not o.startswith("train.run_name=")]
        for combo in itertools.product(*(v for _, v in axes)):
            chosen = list(zip((k for k, _ in axes), combo, strict=True))
            name = "-".join([point.name, *(label(k, v) for k, v in chosen)])
            for i in range(spec.seeds or 1):
                run, values = name, {**point.values, **dict(chosen)}
                overrides = [*head, *settings, *(f"{k}={v}" for k, v in chosen)]
                if spec.seeds is not None:
                    run = f"{name}-s{i}"
                    values[SEED_KEY] = str(base_seed + i)
                    overrides.append(f"{SEED_KEY}={base_seed + i}")
                if run != point.name and run in names:
                    run = f"{run}-{len(out)}"
                names.add(run)
                overrides += min_lr_overrides(overrides)
                out.append(dataclasses.replace(point, name=run, values=values, overrides=[*overrides, f"train.run_name={run}"]))
    return out


def min_lr_overrides(overrides: list[str]) -> list[str]:
    """``optim.min_lr = optim.max_lr / 10`` when ``overrides`` set the one and not the other."""
    given = {k.strip(): v for k, _, v in (o.partition("=") for o in overrides)}
    if LR_KEY not in given or MIN_LR_KEY in given:
        return []
    try:
        return [f"{MIN_LR_KEY}={float(given[LR_KEY]) / MIN_LR_DIVISOR:.12g}"]  # 3e-3 -> 0.0003
    except ValueError:
        return []  # not a number: loading the point's recipe reports it


def extra_axes_args(spec: Any) -> list[str]:
    """The ``wbscale sweep`` arguments of the scoped settings and the seeds."""
    args: list[str] = []
    for arch, key, values in spec.scoped:
        args += ["--set", f"{arch}:{key}={','.join(values)}"]
    if spec.seeds is not None:
        args += ["--seeds", str(spec.seeds)]
    return args
