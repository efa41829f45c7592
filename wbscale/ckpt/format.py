"""The checkpoint format: one folder per step, a ``last`` pointer; reading and verifying it.

Layout under ``runs/<run>/checkpoints/``::

    step-00000100/
        model.ckpt      Lightning checkpoint (a folder of shards under DeepSpeed)
        meta.json       step, samples, topology, recipe, tokenizer hash, wandb id
    last                text file naming the newest complete checkpoint folder

A checkpoint is written into ``.tmp-step-…``, fsynced, then renamed; ``last`` is
replaced atomically after that (:mod:`wbscale.ckpt.writer`). A crash at any point leaves
``last`` naming a complete checkpoint (or no ``last`` at all), never a half-written one.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from wbscale.errors import UserError

STEP_DIR = re.compile(r"^step-(\d{8})$")
MODEL_FILE = "model.ckpt"
META_FILE = "meta.json"
RNG_DIR = "rng"  # rng/rank-00000.pt …: each rank's RNG states (wbscale.ckpt.rng)


@dataclass(frozen=True)
class CheckpointInfo:
    """A complete checkpoint folder and its metadata."""

    path: Path
    step: int
    meta: dict[str, Any]

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def read_checkpoint(path: Path) -> CheckpointInfo:
    """Open a checkpoint folder (or its ``model.ckpt``); UserError if incomplete."""
    path = Path(path)
    if path.name == MODEL_FILE:
        path = path.parent
    if path.is_dir() and (path / "checkpoints").is_dir():  # a run folder: take its newest
        found = latest_checkpoint(path)
        if found is None:
            raise UserError(f"{path}: run folder has no complete checkpoint")
        return found
    if path.is_dir() and (path / "last").is_file():  # a checkpoints/ folder
        found = latest_checkpoint(path.parent)
        if found is not None:
            return found
    meta_path = path / META_FILE
    if not path.is_dir() or not meta_path.is_file() or not (path / MODEL_FILE).exists():
        raise UserError(
            f"{path}: not a complete wbscale checkpoint (expected {META_FILE} and {MODEL_FILE}); "
            "pass a folder like runs/<run>/checkpoints/step-00000100 or a run folder"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{meta_path}: corrupt checkpoint metadata ({err})") from None
    return CheckpointInfo(path=path, step=int(meta["step"]), meta=meta)


def list_checkpoints(run_dir: Path) -> list[CheckpointInfo]:
    """Complete checkpoints of a run, oldest first (temp folders are ignored)."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        if STEP_DIR.match(child.name) and (child / META_FILE).is_file() and (child / MODEL_FILE).exists():
            found.append(read_checkpoint(child))
    return sorted(found, key=lambda c: c.step)


def latest_checkpoint(run_dir: Path) -> CheckpointInfo | None:
    """The checkpoint ``last`` names; the newest complete one if ``last`` is stale."""
    root = checkpoints_dir(run_dir)
    pointer = root / "last"
    if pointer.is_file():
        target = root / pointer.read_text().strip()
        if (target / META_FILE).is_file() and (target / MODEL_FILE).exists():
            return read_checkpoint(target)
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def step_dir_name(step: int) -> str:
    """The folder name of the checkpoint of optimizer step ``step``."""
    return f"step-{step:08d}"


def checkpoint_problems(info: CheckpointInfo) -> list[str]:
    """Missing or truncated files of a checkpoint (by the sizes in its meta.json)."""
    problems = []
    files = info.meta.get("files")
    if files is None:  # written before sizes were recorded: check the shard count at least
        tag = info.model_path / "checkpoint"
        if info.model_path.is_dir():
            found = len(list(tag.glob("*optim_states.pt")))
            expected = int(info.meta.get("world_size") or 1)
            if found < expected:
                problems.append(f"{tag}: {found} optimizer shard(s), expected {expected} (one per rank)")
        return problems
    for rel, size in files.items():
        path = info.path / rel
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != size:
            problems.append(f"{path}: {path.stat().st_size} bytes, expected {size} (truncated or corrupt)")
    return problems


def verify_checkpoint(info: CheckpointInfo) -> None:
    """Raise a UserError naming the first missing or truncated file of a checkpoint."""
    problems = checkpoint_problems(info)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise UserError(
            f"checkpoint {info.path} is damaged: {problems[0]}{more}. Resume from an earlier "
            f"checkpoint (pass --resume {info.path.parent}/step-… or delete {info.path} and use --resume auto)"
        )


def latest_intact_checkpoint(run_dir: Path, warn=None) -> CheckpointInfo | None:
    """The newest checkpoint whose files are all present and complete.

    A damaged newer one is skipped with a warning (``warn(msg)``) naming the file at fault.
    """
    newest = latest_checkpoint(run_dir)
    if newest is None:
        return None
    candidates = [newest] + [c for c in reversed(list_checkpoints(run_dir)) if c.step < newest.step]
    for info in candidates:
        problems = checkpoint_problems(info)
        if not problems:
            return info
        if warn is not None:
            warn(f"warning: skipping damaged checkpoint {info.path}: {problems[0]}")
    raise UserError(
        f"no intact checkpoint in {checkpoints_dir(run_dir)}: every one has missing or truncated "
        "files (see the warnings above); start a new train.run_name or restore the files"
    )


def inspect_checkpoint(path: Path) -> dict[str, Any]:
    """Step, topology, size, tokens seen and an integrity check of a checkpoint."""
    info = read_checkpoint(path)
    files = [p for p in info.path.rglob("*") if p.is_file()]
    recipe = info.meta.get("recipe", {})
    block = recipe.get("model", {}).get("block_size")
    samples = info.meta.get("samples")
    problems = checkpoint_problems(info)
    model_path = info.model_path
    shards = sorted(p.name for p in (model_path / "checkpoint").glob("*.pt")) if model_path.is_dir() else []
    if model_path.is_file() and not problems:
        try:
            state = torch.load(model_path, map_location="cpu", weights_only=False)
            if "state_dict" not in state:
                problems.append(f"{model_path}: no state_dict")
        except Exception as err:  # a truncated or foreign file: report, don't crash
            problems.append(f"{model_path}: unreadable ({type(err).__name__}: {err})")
    return {
        "path": str(info.path),
        "step": info.step,
        "samples": samples,
        "tokens_seen": samples * block if samples is not None and block else None,
        "world_size": info.meta.get("world_size"),
        "strategy": info.meta.get("strategy"),
        "zero_stage": info.meta.get("zero_stage"),
        "sharded": model_path.is_dir(),
        "shards": shards,
        # folders derived by elastic resume / consolidation (not part of the integrity check)
        "derived": sorted(p.name for p in info.path.iterdir() if p.name in ("universal", "full.ckpt")),
        "size_bytes": sum(p.stat().st_size for p in files),
        "files": len(files),
        "model": recipe.get("model", {}),
        "tokenizer_sha256": info.meta.get("tokenizer_sha256"),
        "wandb_id": info.meta.get("wandb_id"),
        "ok": not problems,
        "problems": problems,
    }
