"""The atomic checkpoint writer: a Lightning callback that saves every N steps and at the end.

Every rank writes its part (DeepSpeed shards, its RNG state) into ``.tmp-step-…``; rank 0
adds ``meta.json``, fsyncs, renames the folder into place, then replaces ``last``
(:mod:`wbscale.ckpt.format` describes the layout).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from wbscale.ckpt.format import (
    META_FILE,
    MODEL_FILE,
    RNG_DIR,
    checkpoints_dir,
    list_checkpoints,
    step_dir_name,
)
from wbscale.ckpt.rng import load_rank_rng, save_rank_rng
from wbscale.dist import zero_stage_of
from wbscale.io import atomic_write_json, atomic_write_text, fsync_dir, fsync_tree


class AtomicCheckpoint(L.Callback):
    """Save every ``every`` optimizer steps and at the end of training.

    With ``exit_interval`` the run also saves and stops cleanly at multiples of it.

    ``meta_fn()`` returns the run's metadata (recipe, tokenizer hash, wandb id, …); the
    callback adds step, samples and topology.
    """

    def __init__(self, run_dir: Path, every: int, keep_last: int, meta_fn=None, exit_interval: int = 0):
        self.run_dir = Path(run_dir)
        self.every = every
        self.exit_interval = exit_interval
        self.keep_last = keep_last
        self.meta_fn = meta_fn or (lambda: {})
        self.last_saved_step: int | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        accum = trainer.accumulate_grad_batches
        if (batch_idx + 1) % accum != 0:
            return
        step = trainer.global_step
        stop = self.exit_interval > 0 and step % self.exit_interval == 0
        if step % self.every == 0 or step >= (trainer.max_steps or 0) or stop:
            self.save(trainer)
        if stop and step < trainer.max_steps:
            trainer.should_stop = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.last_saved_step != trainer.global_step and trainer.global_step > 0:
            self.save(trainer)

    def save(self, trainer: L.Trainer) -> Path:
        """Write a checkpoint for the current step on every rank; returns its folder."""
        step = trainer.global_step
        root = checkpoints_dir(self.run_dir)
        final = root / step_dir_name(step)
        tmp = root / f".tmp-{step_dir_name(step)}"
        if trainer.is_global_zero:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            (tmp / RNG_DIR).mkdir(parents=True)
        trainer.strategy.barrier("wbscale-ckpt-begin")
        # Every rank writes: DeepSpeed its shards into model.ckpt/, each rank its RNG state.
        trainer.save_checkpoint(tmp / MODEL_FILE)
        save_rank_rng(tmp, trainer.global_rank)
        trainer.strategy.barrier("wbscale-ckpt-written")
        if trainer.is_global_zero:
            datamodule = trainer.datamodule
            meta = {
                "step": step,
                "samples": datamodule.samples_consumed() if datamodule is not None else None,
                "world_size": trainer.world_size,
                "strategy": type(trainer.strategy).__name__,
                "zero_stage": zero_stage_of(trainer.strategy),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "torch": torch.__version__,
                # sizes of every file the checkpoint holds: integrity check before resume
                "files": _file_sizes(tmp),
                **self.meta_fn(),
            }
            atomic_write_json(tmp / META_FILE, meta)
            fsync_tree(tmp)
            if final.exists():  # a re-save of the same step (e.g. end of a resumed, finished run)
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(root)
            atomic_write_text(root / "last", final.name + "\n")
            self._prune(root)
        trainer.strategy.barrier("wbscale-ckpt-done")
        self.last_saved_step = step
        return final

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # The Lightning state holds rank 0's RNG only (the module restores it on every
        # rank); with the same world size each rank gets its own back.
        if trainer.ckpt_path:
            load_rank_rng(Path(trainer.ckpt_path).parent, trainer.global_rank, trainer.world_size)

    def _prune(self, root: Path) -> None:
        complete = list_checkpoints(self.run_dir)
        for old in complete[: max(0, len(complete) - self.keep_last)]:
            shutil.rmtree(old.path, ignore_errors=True)
        for stray in root.glob(".tmp-step-*"):  # leftovers of a crash mid-save
            shutil.rmtree(stray, ignore_errors=True)


def _file_sizes(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != META_FILE
    }
