"""RNG: what a checkpoint carries, and a per-step stream that makes resume exact.

Two mechanisms, both needed for a bitwise-exact resume with dropout (or anything else that
draws random numbers during training):

- :class:`StepRNG` reseeds every RNG training draws from (torch CPU and every CUDA device,
  numpy, Python) at the start of each optimizer step from ``(train.seed, step, global
  rank)``. The random numbers of step s+1 are then the same whatever ran between the
  steps (validation, sampling, metrics, data-loader start-up, a resume) and each rank has
  its own stream (dropout masks differ between ranks, as they should).
- each checkpoint also holds every rank's RNG state (``rng/rank-NNNNN.pt``, plus rank 0's
  in the Lightning file), restored on resume at the same world size: what runs before the
  first step (e.g. callbacks' ``on_train_start``) sees the state it would have seen.

Data order needs no RNG state: the sampler is keyed on the global sample index
(:mod:`wbscale.data.loader`); the data loaders draw from their own generator.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
from pathlib import Path
from typing import Any

import lightning as L
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


def step_seed(seed: int, step: int, rank: int) -> int:
    """A 63-bit seed for optimizer step ``step`` (0-based: the steps done before it) on ``rank``."""
    words = [int(seed) & 0xFFFFFFFF, (int(seed) >> 32) & 0xFFFFFFFF, int(step), int(rank)]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0]) >> 1


def seed_step(seed: int, step: int, rank: int) -> None:
    """Seed torch (CPU and CUDA), numpy and Python for one optimizer step."""
    s = step_seed(seed, step, rank)
    torch.manual_seed(s)  # also every CUDA device
    np.random.seed(s & 0xFFFFFFFF)
    random.seed(s)


class StepRNG(L.Callback):
    """Reseed at the first micro-batch of every optimizer step (see the module doc).

    Place it first in the callback list, so the whole step draws from the step's stream.
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx % max(1, trainer.accumulate_grad_batches) == 0:
            seed_step(self.seed, trainer.global_step, trainer.global_rank)


def rank_rng_path(folder: Path, rank: int) -> Path:
    """Where a checkpoint folder keeps global rank ``rank``'s RNG state."""
    return Path(folder) / RNG_DIR / f"rank-{rank:05d}.pt"


def save_rank_rng(folder: Path, rank: int) -> tuple[str, int, str]:
    """Write this process's RNG state into checkpoint ``folder`` (each rank its own file).

    Hashed while written: returns (path relative to ``folder``, size, sha256).
    """
    buf = io.BytesIO()
    torch.save(rng_state(), buf)
    data = buf.getvalue()
    path = rank_rng_path(folder, rank)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return path.relative_to(folder).as_posix(), len(data), hashlib.sha256(data).hexdigest()


def load_rank_rng(folder: Path, rank: int, world_size: int) -> None:
    """Restore this rank's RNG state from ``folder`` when it was written at the same world size."""
    meta_path = Path(folder) / META_FILE
    path = rank_rng_path(folder, rank)
    if not meta_path.is_file() or not path.is_file():
        return
    if json.loads(meta_path.read_text()).get("world_size") != world_size:
        return  # another world size: ranks do not correspond; rank 0's state stays
    set_rng_state(torch.load(path, map_location="cpu", weights_only=False))
