"""Elastic resume (stub)."""
from __future__ import annotations

from dataclasses import dataclass

from wbscale.config import Recipe
from wbscale.train.checkpoint import CheckpointInfo


@dataclass(frozen=True)
class ResumePlan:
    ckpt_path: str | None
    load_universal: bool = False


def plan_resume(recipe: Recipe, ckpt: CheckpointInfo | None) -> ResumePlan:
    if ckpt is None:
        return ResumePlan(None)
    return ResumePlan(str(ckpt.model_path))
