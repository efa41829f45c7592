"""LightningDataModule over prepared token shards with an exactly resumable sampler.

The sampler is keyed on a global sample index, so the only state a checkpoint needs is
how many samples the run has consumed; resume (also at another world size) continues
with exactly the next sample of the global stream. The loaders draw their (unused, with no
worker processes) base seed from a generator of their own, never from the global torch RNG
that dropout uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from wbscale.config import Recipe
from wbscale.data.loader import TrainStream, val_batches


class TokenDataModule(L.LightningDataModule):
    """Train stream + fixed validation batches for one recipe."""

    def __init__(self, recipe: Recipe, data_dir: Path):
        super().__init__()
        self.recipe = recipe
        self.data_dir = Path(data_dir)
        # (global step, samples consumed) at the checkpoint this run resumed from.
        self._base_step = 0
        self._base_samples = 0

    def samples_per_step(self) -> int:
        t = self.recipe.train
        return t.micro_batch_size * t.grad_accum * self.trainer.world_size

    def samples_consumed(self) -> int:
        """Global samples the optimizer has seen at the current step."""
        return self._base_samples + (self.trainer.global_step - self._base_step) * self.samples_per_step()

    def train_dataloader(self) -> DataLoader:
        t = self.recipe.train
        stream = TrainStream(
            self.data_dir,
            "train",
            seq_len=self.recipe.model.block_size,
            micro_batch_size=t.micro_batch_size,
            seed=self.recipe.data.seed,
            start_sample=self.samples_consumed(),
            rank=self.trainer.global_rank,
            world_size=self.trainer.world_size,
        )
        return DataLoader(stream, batch_size=None, num_workers=0, generator=self._generator())

    def val_dataloader(self) -> DataLoader:
        # Every rank evaluates the same batches: the val loss is then identical to a
        # single-process run's, whatever the world size.
        t = self.recipe.train
        batches = val_batches(self.data_dir, self.recipe.model.block_size, t.micro_batch_size, t.val_batches)
        return DataLoader(batches, batch_size=None, num_workers=0, generator=self._generator())

    def _generator(self) -> torch.Generator:
        # Creating a loader's iterator draws a base seed; from the global RNG by default,
        # which would shift the dropout stream by one draw per validation run.
        return torch.Generator().manual_seed(self.recipe.data.seed)

    def state_dict(self) -> dict[str, Any]:
        return {"samples": self.samples_consumed(), "step": self.trainer.global_step, "seed": self.recipe.data.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._base_step = int(state["step"])
        self._base_samples = int(state["samples"])
