"""RNG capture and restore: the states a checkpoint carries so a resumed run draws the same numbers."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wbscale.ckpt.format import META_FILE, RNG_DIR


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and every CUDA device's) RNG state of this process."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rank_rng_path(folder: Path, rank: int) -> Path:
    """Where a checkpoint folder keeps global rank ``rank``'s RNG state."""
    return Path(folder) / RNG_DIR / f"rank-{rank:05d}.pt"


def save_rank_rng(folder: Path, rank: int) -> None:
    """Write this process's RNG state into checkpoint ``folder`` (each rank its own file)."""
    torch.save(rng_state(), rank_rng_path(folder, rank))


def load_rank_rng(folder: Path, rank: int, world_size: int) -> None:
    """Restore this rank's RNG state from ``folder`` when it was written at the same world size."""
    meta_path = Path(folder) / META_FILE
    path = rank_rng_path(folder, rank)
    if not meta_path.is_file() or not path.is_file():
        return
    if json.loads(meta_path.read_text()).get("world_size") != world_size:
        return  # another world size: ranks do not correspond; rank 0's state stays
    set_rng_state(torch.load(path, map_location="cpu", weights_only=False))
